"""engine: trtllm-build on GPU targets, the reference engine on the CPU target (``stage``); the
trtllm-build command and NVIDIA's tuning advice (``trtllm``)."""
