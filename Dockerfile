# The GPU target: build engines and serve them inside NVIDIA's Triton + TensorRT-LLM container.
#
# Pinned to the 25.12 release: it is built on TensorRT-LLM 1.2.x, the last release line that has
# trtllm-build and the Triton `tensorrtllm` backend (1.3 removed the engine path), with PyTorch 2.9
# and transformers 4.57.3, the versions this project is tested against. The build fails below if
# the image carries another TensorRT-LLM line, so a retagged image cannot slip through.
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3
FROM ${BASE_IMAGE}

RUN python3 -c "import sys; from importlib.metadata import version; v = tuple(int(p) for p in version('tensorrt_llm').split('.')[:2]); sys.exit(0 if (1, 2) <= v < (1, 3) else f'tensorrt_llm {v} is not 1.2.x: use a 25.12 image')"

WORKDIR /opt/pipeline
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY conf ./conf
COPY model_repo ./model_repo
# The container's torch, transformers, modelopt and tensorrt_llm stay as they are: the package goes
# in without dependencies, then only what the container lacks.
RUN pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir "hydra-core==1.3.8" "omegaconf==2.3.1" "gguf==0.19.0" "psutil" "tqdm" "pyyaml" \
        "tritonclient[grpc,http]==2.73.0" "mlflow==3.17.2" "nvidia-modelopt>=0.47"

# Artifacts (engines, repositories, mlflow.db) and the Hugging Face cache live outside the image.
ENV HF_HOME=/cache/huggingface
VOLUME ["/workdir", "/cache/huggingface"]
WORKDIR /workdir
ENTRYPOINT ["python3", "-m", "pipeline"]
CMD ["--help"]
