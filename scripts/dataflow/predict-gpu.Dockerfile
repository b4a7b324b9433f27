# Worker image for `python -m infer_gpu predict --engine beam` on Dataflow GPU workers
# (docs/predict.md, "Predict on Beam and Dataflow"). Build from the checkout's root:
#   docker build -f scripts/dataflow/predict-gpu.Dockerfile -t REGION-docker.pkg.dev/PROJECT/hpa/predict-gpu:0.1 .
# The Beam SDK image (same Python and Beam versions as the launching machine), the project's
# pinned requirements, and TensorFlow's CUDA wheels (the driver comes from Dataflow's
# worker_accelerator=...;install-nvidia-driver).
FROM apache/beam_python3.11_sdk:2.77.0
COPY requirements.txt requirements-beam.txt /tmp/hpa/
RUN pip install --no-cache-dir -r /tmp/hpa/requirements.txt -r /tmp/hpa/requirements-beam.txt \
 && pip install --no-cache-dir "tensorflow[and-cuda]==2.21.0"
COPY . /opt/hpa-scc
RUN pip install --no-cache-dir --no-deps /opt/hpa-scc
ENV TF_CPP_MIN_LOG_LEVEL=2
