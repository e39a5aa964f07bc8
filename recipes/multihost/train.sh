#!/usr/bin/env bash
# Train a hybrid-ext recipe across several machines with one launcher. Run it on the first host:
#
#   recipes/multihost/train.sh horovod   [recipe options]  # horovodrun -np 4 -H node0:2,node1:2 --gloo ...
#   recipes/multihost/train.sh deepspeed [recipe options]  # deepspeed --hostfile HOSTFILE --master_addr node0 ...
#   recipes/multihost/train.sh torchrun  [recipe options]  # torchrun --nnodes 2 ... on every host (over ssh)
#
# HOSTS (default "node0 node1") names the machines and SLOTS (default 2) the ranks on each; IFACE (default eth0)
# is the interface they reach each other on. Every host needs passwordless ssh to the others by name and this
# checkout and Python environment at the same path (a shared home, or the same image). On one Linux machine:
#
#   hybrid-ext cluster up --hosts 2 && hybrid-ext cluster run node0 -- recipes/multihost/train.sh horovod
set -euo pipefail
launcher=${1:?usage: train.sh horovod|deepspeed|torchrun [recipe options]}
shift
read -r -a hosts <<< "${HOSTS:-node0 node1}"
slots=${SLOTS:-2}
iface=${IFACE:-eth0}
port=${MASTER_PORT:-29500}
np=$((${#hosts[@]} * slots))
root=$(cd "$(dirname "$0")/../.." && pwd)
# gloo (torch.distributed, the butterfly backend, DeepSpeed on CPU, hybrid-ext's side channel) binds here.
export GLOO_SOCKET_IFNAME=$iface

case $launcher in
horovod)
    host_slots=$(printf "%s:$slots," "${hosts[@]}")
    # horovodrun hands its whole environment to the ranks it starts over ssh.
    exec horovodrun -np "$np" -H "${host_slots%,}" --gloo --network-interface "$iface" \
        python "$root/recipes/horovod/train_cnn.py" --strategy hybrid --reducer butterfly "$@"
    ;;
deepspeed)
    hostfile=$(mktemp)
    printf "%s slots=$slots\n" "${hosts[@]}" > "$hostfile"
    # DeepSpeed forwards PYTHON* and NCCL_* itself; the rest goes through a .deepspeed_env file.
    export DS_ENV_FILE=$(mktemp)
    env | grep -E '^(PATH|GLOO_SOCKET_IFNAME|DS_ACCELERATOR|OMP_NUM_THREADS|HYBRID_EXT_[A-Z_]+)=' > "$DS_ENV_FILE" || true
    status=0
    deepspeed --hostfile "$hostfile" --master_addr "${hosts[0]}" --master_port "$port" \
        "$root/recipes/deepspeed/train_cnn.py" --deepspeed_config "$root/recipes/deepspeed/hybrid-butterfly.json" \
        "$@" || status=$?
    rm -f "$hostfile" "$DS_ENV_FILE"
    exit $status
    ;;
torchrun)
    # One torchrun per host, with a static master on the first host (--node-rank, --master-addr). hybrid-ext's own
    # settings (HYBRID_EXT_*: check mode, transport, algorithm...) go to every host: ranks that disagree on them
    # (check mode on one host only) would not run the same collectives.
    forwarded=()
    for var in $(compgen -e | grep '^HYBRID_EXT_' || true); do forwarded+=("$var=${!var}"); done
    torchrun_command() {  # $1: this host's node rank; sets the array cmd
        cmd=(env "PATH=$PATH" "PYTHONPATH=${PYTHONPATH:-}" "GLOO_SOCKET_IFNAME=$iface" "${forwarded[@]}"
            torchrun --nnodes "${#hosts[@]}" --nproc-per-node "$slots" --node-rank "$1"
            --master-addr "${hosts[0]}" --master-port "$port"
            "$root/recipes/torch/train_cnn.py" --backend butterfly --strategy hybrid --reducer butterfly)
    }
    pids=()
    for rank in $(seq 1 $((${#hosts[@]} - 1))); do
        torchrun_command "$rank"
        ssh "${hosts[$rank]}" "cd $(printf %q "$PWD") && $(printf '%q ' "${cmd[@]}" "$@")" &
        pids+=($!)
    done
    status=0
    torchrun_command 0
    "${cmd[@]}" "$@" || status=$?
    for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
    exit $status
    ;;
*)
    echo "train.sh: unknown launcher '$launcher' (horovod, deepspeed or torchrun)" >&2
    exit 2
    ;;
esac
