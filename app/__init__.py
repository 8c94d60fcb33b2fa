"""The apps on top of the library: the Gradio chat app (`app.chat_app`, `mlx-deepseek chat`; UI code only)
and the OpenAI-compatible server beside it. Importing `app` imports neither Gradio nor the server."""


def launch(*args, **kwargs):
    """Serve the chat app (see app.chat_app.launch); imports Gradio only when called."""
    from .chat_app import launch as _launch

    return _launch(*args, **kwargs)
