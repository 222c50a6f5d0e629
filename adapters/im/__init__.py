"""IM adapters: Yach and the terminal channel."""
