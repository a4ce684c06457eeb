# syntax=docker/dockerfile:1
# The MLflow tracking server of infra/deploy/compose.yaml. MLflow's own image
# has neither a PostgreSQL driver nor boto3 (mlflow/mlflow#9513, #8342), so it
# is built here: the server version is the rayrec image's client (its Dockerfile
# constrains mlflow to the same MLFLOW_VERSION, inside pyproject's mlflow>=3,<4),
# psycopg 3 for the store (postgresql+psycopg://), boto3 for the S3 artifacts.
FROM python:3.11-slim

ARG MLFLOW_VERSION=3.17.2
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.2" "boto3>=1.34" \
 && useradd --create-home --uid 1000 mlflow

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--help"]
