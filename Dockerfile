# specfleet: one image for the KubeRay head and every worker (drafters, targets).
# Python 3.11, the dependencies exactly as pyproject.toml pins them (Ray 2.60 is
# the manifests' rayVersion), the code, the cluster configs and the model zoo.
#
#   docker build -t specfleet:0.1.0 .
#
# torch comes from PyPI, whose Linux wheel runs on NVIDIA GPUs and on CPU alike.
FROM python:3.11-slim

# wget: KubeRay's default health probes run it inside Ray containers.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 specfleet

# Relative cluster-config paths (deploy/serve/specfleet.yaml's `config`) resolve here.
WORKDIR /app

# Dependencies first, from pyproject.toml's pins, so a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

COPY --chown=specfleet README.md ./
COPY --chown=specfleet protos/ protos/
COPY --chown=specfleet actors/ actors/
COPY --chown=specfleet cluster/ cluster/
COPY --chown=specfleet bench/ bench/
COPY --chown=specfleet deploy/ deploy/
COPY --chown=specfleet models/ models/
RUN pip install --no-deps --editable .

USER specfleet
EXPOSE 8000 50051
# Outside Kubernetes (KubeRay replaces the command with `ray start`): the zoo on
# a Ray cluster inside the container, gRPC on port 50051.
CMD ["specfleet", "up", "--host", "0.0.0.0"]
