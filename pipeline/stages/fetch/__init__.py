"""fetch: the model as a safetensors Hugging Face checkpoint (``stage``), from the Hub (``hub``), a
folder, or a GGUF file (``gguf``)."""
