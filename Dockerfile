# The Patient Service: runtime requirements only, run as an unprivileged user.
# The entry point waits for PostgreSQL and RabbitMQ, migrates, then serves.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system patient \
    && useradd --system --gid patient --no-create-home --home-dir /app patient

WORKDIR /app

COPY requirements.txt ./
RUN pip install --no-input -r requirements.txt

COPY alembic.ini config.yml ./
COPY migrations/ migrations/
COPY scripts/lib.sh scripts/serve scripts/
COPY patient/ patient/
COPY queue_standin/ queue_standin/
RUN mkdir -p /var/lib/queue-standin && chown patient:patient /var/lib/queue-standin

USER patient
EXPOSE 8000

ENTRYPOINT ["scripts/serve"]
