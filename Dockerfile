# syntax=docker/dockerfile:1
# relay: build the wheel and its dependencies into a venv, then copy only the venv into a slim
# runtime image without pip, compilers or the source tree; it runs as an unprivileged user and
# needs no writable path but /tmp (k8s/base/deployment.yaml mounts an emptyDir there).
# The internal port (admin API, metrics, probes, peer links) listens on 127.0.0.1 unless told
# otherwise: in a container, probes and peers come from outside it, hence --admin-host.
FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/relay
COPY pyproject.toml README.md ./
COPY relay ./relay
RUN /opt/relay/bin/pip install . \
    && /opt/relay/bin/pip uninstall --yes pip setuptools wheel

FROM python:3.11-slim-bookworm
RUN python -m pip uninstall --yes pip setuptools wheel \
    && groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid relay --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /opt/relay /opt/relay
ENV PATH=/opt/relay/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["relay"]
CMD ["serve", "--host=0.0.0.0", "--admin-host=0.0.0.0", "--data-dir=/tmp/relay"]
