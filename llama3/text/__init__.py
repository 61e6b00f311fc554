"""Text: the tiktoken tokenizer (`tokenizer`), the hand-written chat formats (`chat_format`) and a checkpoint's
own Jinja chat template (`template`).
"""
