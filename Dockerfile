# The GPU target: build engines and serve them inside NVIDIA's Triton + TensorRT-LLM container.
#
# Supported bases carry TensorRT-LLM 1.1.x or 1.2.x, the last release lines with trtllm-build and
# the Triton `tensorrtllm` backend (1.3 removed the engine path):
#   - nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3 (the default): TensorRT-LLM 1.1.0,
#     Python 3.12, PyTorch 2.9, TensorRT 10.13 (NVIDIA's Triton compatibility matrix);
#   - an image built from the tensorrtllm_backend repository's dockerfile/Dockerfile.triton.trt_llm_backend
#     with TENSORRTLLM_VER=1.2.1 (25.12 bases), passed as --build-arg BASE_IMAGE=<that image>.
# backend=pytorch (TensorRT-LLM >= 1.3, no engines) builds on a newer image:
#   docker build --build-arg BACKEND=pytorch \
#     --build-arg BASE_IMAGE=nvcr.io/nvidia/tritonserver:<yy.mm>-trtllm-python-py3 .
# with a tag whose TensorRT-LLM is 1.3 or newer; the build then fetches upstream's LLM-API Triton
# model (triton_backend/all_models/llmapi) at exactly the installed TensorRT-LLM version, which the
# rendered repositories copy (PIPELINE_LLMAPI_MODEL_DIR).
# Check any image with
#   docker run --rm <image> python3 -c "import tensorrt_llm; print(tensorrt_llm.__version__)"
# The build fails below on any other TensorRT-LLM line, so a retagged image cannot slip through.
ARG BASE_IMAGE=nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3
FROM ${BASE_IMAGE}
ARG BACKEND=tensorrt

RUN if [ "$BACKEND" = pytorch ]; then \
      python3 -c "import sys; from importlib.metadata import version; v = tuple(int(p) for p in version('tensorrt_llm').split('.')[:2]); sys.exit(0 if v >= (1, 3) else f'tensorrt_llm {v} is older than 1.3: BACKEND=pytorch needs a newer image')"; \
    else \
      python3 -c "import sys; from importlib.metadata import version; v = tuple(int(p) for p in version('tensorrt_llm').split('.')[:2]); sys.exit(0 if (1, 1) <= v < (1, 3) else f'tensorrt_llm {v} is not 1.1.x or 1.2.x: see the supported images at the top of the Dockerfile')"; \
    fi

# tini as PID 1: `docker stop` reaches Python and zombies of tritonserver/mpirun are reaped.
RUN apt-get update -q=2 && apt-get install -y --no-install-recommends tini git && rm -rf /var/lib/apt/lists/*

# backend=pytorch: upstream's LLM-API model (model.py, helpers.py) at the installed TensorRT-LLM's tag
# (its version read from the package metadata: importing tensorrt_llm needs a GPU driver, which an
# image build does not have)
ENV PIPELINE_LLMAPI_MODEL_DIR=/opt/tensorrt_llm_llmapi/tensorrt_llm/1
RUN if [ "$BACKEND" = pytorch ]; then \
      v=$(python3 -c "from importlib.metadata import version; print(version('tensorrt_llm'))") \
      && git clone --quiet --depth 1 --branch "v$v" --filter=blob:none --sparse https://github.com/NVIDIA/TensorRT-LLM.git /tmp/trtllm \
      && git -C /tmp/trtllm sparse-checkout set triton_backend/all_models/llmapi \
      && mkdir -p /opt/tensorrt_llm_llmapi \
      && cp -r /tmp/trtllm/triton_backend/all_models/llmapi/tensorrt_llm /opt/tensorrt_llm_llmapi/ \
      && rm -rf /tmp/trtllm \
      && test -f "$PIPELINE_LLMAPI_MODEL_DIR/model.py" -a -f "$PIPELINE_LLMAPI_MODEL_DIR/helpers.py"; \
    fi

WORKDIR /opt/pipeline
COPY pyproject.toml constraints.txt README.md ./
COPY pipeline ./pipeline
COPY conf ./conf
COPY model_repo ./model_repo
# The container's packages (tensorrt_llm, torch, transformers and the nvidia-modelopt that
# TensorRT-LLM pins) stay exactly as they are: every installed version becomes a constraint, so pip
# adds only what the container lacks, in versions that fit, and fails rather than upgrade one. The
# quantize recipes work with both ModelOpt config schemas (pipeline/stages/quantize/recipes.py). `pip check`
# fails the build on a conflict the install introduced; NGC images may carry conflicts of their own,
# taken before the install and left alone.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN pip list --format=freeze > /tmp/container-packages.txt \
 && (pip check > /tmp/conflicts-before.txt || true) \
 && pip install --no-cache-dir --no-deps -e . \
 && pip install --no-cache-dir --constraint /tmp/container-packages.txt \
        "hydra-core>=1.3,<1.4" "omegaconf>=2.3,<2.4" "gguf>=0.10" psutil tqdm pyyaml \
        "tritonclient[grpc,http]>=2.51" "mlflow>=3.7" \
        "fastapi>=0.110" "uvicorn>=0.29" "prometheus-client>=0.20" "requests>=2.31" "datasets>=3" \
        "lm-eval[api]>=0.4.9,<0.5" "optuna>=4,<6" \
        nvidia-ml-py \
 && (pip check > /tmp/conflicts-after.txt || true) \
 && ! grep -v "^No broken requirements" /tmp/conflicts-after.txt | grep -vxF -f /tmp/conflicts-before.txt

# Triton's HTTP, gRPC and metrics ports, and the OpenAI-compatible API (`serve`, openai.port)
EXPOSE 8000 8001 8002 9000

# Artifacts (engines, repositories, mlflow.db) and the Hugging Face cache live outside the image.
ENV HF_HOME=/cache/huggingface
VOLUME ["/workdir", "/cache/huggingface"]
WORKDIR /workdir
ENTRYPOINT ["tini", "--", "python3", "-m", "pipeline"]
CMD ["--help"]
