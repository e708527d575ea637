# Settings shared by the launch scripts; override any of them in the environment.
# Sourced, not run: `source launch/env.sh` is done by every script.
: "${TPU_NAME:=sparsemem}"                 # the TPU VM (slice) name
: "${ZONE:=us-east5-a}"                    # a zone that has the accelerator (v5p: us-east5-a; v6e: us-east5-b ...)
: "${ACCELERATOR:=v5p-32}"                 # Cloud accelerator type, as `sparsemem compile --topology` takes it
: "${RUNTIME:=v2-alpha-tpuv5}"             # TPU VM image (v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
: "${BUCKET:?set BUCKET=gs://your-bucket (models, data and run directories go there)}"
: "${JAX_VERSION:=$(python3 -c 'import jax; print(jax.__version__)')}"  # the workers get the same jax
: "${REMOTE_DIR:=sparsemem}"               # the project's folder on every worker (under $HOME)

export TPU_NAME ZONE ACCELERATOR RUNTIME BUCKET JAX_VERSION REMOTE_DIR

# Run a shell command on every worker of the slice (or on $WORKER, e.g. WORKER=0).
on_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="${WORKER:-all}" --command "$1"
}
