"""Image questions: turn an entry's images into what the upstream takes (SPEC §7)."""

from __future__ import annotations

from bridge.config import Settings
from bridge.inbox import Entry
from bridge.interfaces import ImageInput
from bridge.relay import PreparedInput

__all__ = ["ImagePipeline"]


class ImagePipeline:
    """`none` refuses images; `native` passes their URLs on, unfetched."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.resolved_image_pipeline

    async def prepare(self, entry: Entry) -> PreparedInput:
        message = entry.message
        if not message.image_urls:
            return PreparedInput(message.text)
        if self.mode == "native":
            return PreparedInput(message.text, tuple(ImageInput(u) for u in message.image_urls))
        return PreparedInput(message.text, refusal="image_refused")
