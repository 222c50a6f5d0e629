"""Every sentence the bot itself says, in each language of BRIDGE_LANG."""

from __future__ import annotations

from typing import Any

__all__ = ["MESSAGES", "Catalogue"]

MESSAGES: dict[str, dict[str, str]] = {
    "zh": {
        "help": (
            "我是接入了 AI 助手的机器人，@我 并输入问题即可。\n"
            "命令：\n"
            "- /reset（重置、新对话）：开始新的对话\n"
            "- /stop（停止）：停止正在生成的回答\n"
            "- /status（状态）：查看当前会话\n"
            "- /help（帮助）：显示本说明"
        ),
        "reset_done": "已开始新的对话。",
        "stopped": "已停止回答。",
        "nothing_to_stop": "当前没有正在生成的回答。",
        "status": "上游：{upstream}\n会话时长：{age}\n对话轮数：{turns}\n排队消息：{queue}",
        "status_none": "上游：{upstream}\n当前还没有对话。排队消息：{queue}",
        "busy": "上一个问题还在回答中，排队的消息太多了，请稍后再发。",
        "rate_limited": "消息发送太频繁了，请稍后再试。",
        "input_too_long": "消息太长了（{length} 字，上限 {limit} 字），请精简后再发。",
        "unsupported_type": "暂不支持这种消息类型，请发送文字或图片。",
        "image_too_large": "图片太大了（上限 {limit}），请压缩后再发。",
        "image_too_many": "一条消息最多 {limit} 张图片，请分开发送。",
        "image_refused": "暂不支持图片消息，请用文字描述问题。",
        "image_failed": "图片读取失败，请重新发送或用文字描述问题。",
        "image_service_failed": "图片识别服务暂时不可用，请稍后再试或用文字描述问题。",
        "question_label": "第 {id} 题：",
        "thinking": "正在思考，请稍候……",
        "cut_off": "（回答中断，以上内容可能不完整）",
        "answer_too_long": "（回答过长，已在此截断）",
        "broken_before_answer": "AI 服务的回答在开始前中断了，请稍后再试。",
        "upstream_unavailable": "AI 服务暂时无法访问，请稍后再试。",
        "upstream_auth": "AI 服务认证失败，已通知管理员处理。",
        "upstream_not_found": "AI 服务配置有误（找不到所请求的服务或智能体），已通知管理员处理。",
        "upstream_timeout": "AI 服务响应超时，请稍后再试。",
        "upstream_rate_limited": "AI 服务繁忙，请稍后再试。",
        "upstream_rejected": "AI 服务无法处理这个问题，请换个问法再试。",
        "rejected_midway": "（回答中断，以上内容可能不完整：AI 服务无法继续处理这个问题，"
        "请换个问法再试。）",
        "rate_limited_midway": "（回答中断，以上内容可能不完整：AI 服务繁忙，请稍后再试。）",
        "unavailable_midway": "（回答中断，以上内容可能不完整：AI 服务暂时不可用，请稍后再试。）",
        "empty_answer": "AI 服务没有给出回答，请换个问法再试。",
        "dead_letter": "抱歉，这条消息多次处理失败，已放弃。请稍后重新发送。",
        "agent_switch": "→ 转由「{agent}」回答",
        "suggestions_title": "你还可以问：",
        "correction_title": "更正：",
        "age_minutes": "{minutes} 分钟",
        "age_hours": "{hours} 小时",
        "age_days": "{days} 天",
    },
    "en": {
        "help": (
            "I relay your questions to an AI assistant: mention me with your question.\n"
            "Commands:\n"
            "- /reset (or /new): start a new conversation\n"
            "- /stop: stop the answer in progress\n"
            "- /status: show this conversation's state\n"
            "- /help: show this help"
        ),
        "reset_done": "Started a new conversation.",
        "stopped": "Stopped.",
        "nothing_to_stop": "No answer is in progress.",
        "status": "Upstream: {upstream}\nSession age: {age}\nTurns: {turns}\nQueued: {queue}",
        "status_none": "Upstream: {upstream}\nNo conversation yet. Queued: {queue}",
        "busy": "Still answering earlier messages and too many are waiting; please send it later.",
        "rate_limited": "You are sending messages too fast; please wait a moment.",
        "input_too_long": "That message is too long ({length} characters, limit {limit}).",
        "unsupported_type": "This kind of message is not supported; please send text or an image.",
        "image_too_large": "That image is too large (limit {limit}); please send a smaller one.",
        "image_too_many": "At most {limit} images per message; please send them separately.",
        "image_refused": "Images are not supported here; please describe the question in text.",
        "image_failed": "The image could not be read; please send it again or use text.",
        "image_service_failed": "Image recognition is unavailable right now; try again later.",
        "question_label": "Question {id}:",
        "thinking": "Thinking…",
        "cut_off": "(The answer was cut off; the text above may be incomplete.)",
        "answer_too_long": "(The answer was too long and was cut off here.)",
        "broken_before_answer": "The AI service's answer broke off before it began; please "
        "try again later.",
        "upstream_unavailable": "The AI service is unreachable right now; please try again later.",
        "upstream_auth": "The AI service refused our credentials; the operator has been told.",
        "upstream_not_found": "The AI service is not set up correctly (what we asked for was "
        "not found); the operator has been told.",
        "upstream_timeout": "The AI service took too long to answer; please try again later.",
        "upstream_rate_limited": "The AI service is busy; please try again in a moment.",
        "upstream_rejected": "The AI service could not handle this request; try rephrasing it.",
        "rejected_midway": "(The answer was cut off; the text above may be incomplete: the AI "
        "service could not go on with this request. Try rephrasing it.)",
        "rate_limited_midway": "(The answer was cut off; the text above may be incomplete: the "
        "AI service is busy. Please try again in a moment.)",
        "unavailable_midway": "(The answer was cut off; the text above may be incomplete: the "
        "AI service is unavailable right now. Please try again later.)",
        "empty_answer": "The AI service gave no answer; try rephrasing the question.",
        "dead_letter": "Sorry, this message failed repeatedly and was dropped; please resend it.",
        "agent_switch": "→ {agent} takes over",
        "suggestions_title": "You could also ask:",
        "correction_title": "Correction:",
        "age_minutes": "{minutes} min",
        "age_hours": "{hours} h",
        "age_days": "{days} d",
    },
}


class Catalogue:
    """The bot's sentences in one language."""

    def __init__(self, lang: str) -> None:
        self.lang = lang
        self._messages = MESSAGES[lang]

    def __call__(self, key: str, **values: Any) -> str:
        return self._messages[key].format(**values)

    def age(self, seconds: float) -> str:
        # A session made by a host whose clock runs ahead looks made in the future: just now.
        seconds = max(seconds, 0.0)
        if seconds < 3600:
            return self("age_minutes", minutes=int(seconds // 60))
        if seconds < 86400:
            return self("age_hours", hours=int(seconds // 3600))
        return self("age_days", days=int(seconds // 86400))

    @staticmethod
    def size(n_bytes: int) -> str:
        """A size for people: `10 MB`, `500 KB`."""
        if n_bytes >= 1024 * 1024:
            return f"{n_bytes / (1024 * 1024):.3g} MB"
        return f"{max(n_bytes / 1024, 0.001):.3g} KB"
