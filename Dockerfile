# n4 on NVIDIA GPUs: the OpenAI-compatible server (`n4 serve`) for Nemotron-4 checkpoints.
#
#   docker build -t n4 .
#   docker run --gpus all --ipc=host -p 8000:8000 -v /path/to/nemotron-4-15b-fp8:/model:ro n4
#   docker run --gpus all --ipc=host -p 8000:8000 -v /ckpt/nemotron-4-340b-fp8:/model:ro n4 --model /model -tp 8
#
# Arguments after the image name replace CMD (the default `--model /model`); ENTRYPOINT keeps `n4 serve` on
# 0.0.0.0:8000. `docker stop` sends SIGTERM and n4 drains for --shutdown-timeout (30 s) before aborting what is
# left, so give docker longer than that: `docker stop -t 40`.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/n4 \
    PATH=/opt/n4/bin:$PATH \
    N4_DEMO_MODEL=/opt/n4-src/models/demo

# Python 3.12 (Ubuntu 24.04's). Triton compiles a small C launcher for each kernel at first use, so gcc and
# the Python headers stay in the image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/n4 \
    && useradd --system --create-home n4

WORKDIR /opt/n4-src

# Runtime dependencies first, read from pyproject.toml (no test extras): torch from PyPI is its CUDA build and
# the largest layer, so it is rebuilt only when the dependency list changes.
COPY pyproject.toml README.md ./
RUN python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
print('\n'.join(deps))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY n4 n4
COPY kernels kernels
COPY model model
COPY server server
COPY quantize quantize
COPY benchmarks benchmarks
# The import check runs from / so that it imports the installed copy, which is what `n4` runs, not this source tree.
RUN pip install --no-deps . \
    && cd / && python -c "import n4.cli, server.api.app, kernels, model, quantize"

# The tiny random-weight demo checkpoint, for a smoke test:
#   docker run --gpus all -p 8000:8000 n4 --model /opt/n4-src/models/demo
# The installed packages have no models/ beside them, so N4_DEMO_MODEL (ENV above) points n4 here: the default
# --model, and the tokenizer that `--load-format dummy` presets borrow.
COPY models/demo models/demo
RUN cd / && python -c "import os, server.api.cli as c; assert os.path.isdir(c.DEMO_MODEL), c.DEMO_MODEL"

USER n4
EXPOSE 8000
# /health is 200 once the engine serves, 503 while draining or after an engine failure; loading can take minutes.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["n4", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "/model"]
