"""Encoder checkpoints: reading them in their official formats and loading them strictly.

- `reading`: any weight file (.safetensors, or a torch pickle .pth/.pt/.bin) as a
  flat state dict on the CPU, and guessing its format from its key names.
- `conversion`: the official formats (DINOv2 hub, timm, XMAG release, Hugging
  Face ViT) converted to our state dict; the formats are described there.
- `fitting`: the strict check that a converted state dict fits a model, naming
  every key that does not, and `load_vit_weights` (convert, then fit).
- `xmag_format`: our own checkpoint files (encoder, slide heads, metadata),
  and `load_encoder`, which loads any supported file.
"""
