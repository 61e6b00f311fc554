"""Checkpoints: finding them (`hub`), reading them (`safetensors`, `meta` for Meta's .pth, `gguf`), building a
model from the tensors (`build`) and writing checkpoints (`save`). Knows nothing of the model's code: `build`
makes whatever class `Transformer.from_pretrained` hands it.
"""
