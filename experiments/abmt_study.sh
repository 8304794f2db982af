#!/usr/bin/env bash
# Why does ABMT not adapt on the previous synthetic world (generator version 3 settings, pinned
# below) while MMT does? Every run on its larger target test split (num_test_ids=350: 874 queries,
# 2,605 gallery images), two seeds each, from each run's own source model. Results:
# experiments/results_training.md.
# Usage: [PARALLEL=1] [SEEDS="1 2"] [ONLY=regex] [EXTRA="--config.x=y"] bash experiments/abmt_study.sh
# (EXTRA is appended to every run's flags, e.g. a longer pre-training; use another RUNS_DIR.)
# Results: workdirs/abmt_study/<run>_s<seed>/, summarised by experiments/summarise.py.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
out=${RUNS_DIR:-workdirs/abmt_study}
mkdir -p "$out"
big="--config.data.synthetic.num_test_ids=350 --config.data.synthetic.domain_gap=1.0 --config.data.crop_pad=10 --config.train.lr=3.5e-4"
kmeans="--config.cluster.method=kmeans --config.cluster.num_clusters=80"
runs=(
  "mmt|--config=configs/mmt.py"
  "cluster_baseline|--config=configs/cluster_baseline.py"
  "abmt|--config=configs/abmt.py"
  "abmt_kmeans|--config=configs/abmt.py $kmeans"
  # The two-branch network trained as the clustering baseline (CE + hard triplet on each branch,
  # averaged, no teacher terms): isolates the architecture from ABMT's objective.
  "abmt_net_baseline|--config=configs/abmt.py $kmeans --config.loss.ce=0.5 --config.loss.tri=0.5 --config.loss.soft_ce=0.0 --config.loss.soft_tri=0.0"
  # Which view the EMA teacher sees: ABMT's teacher on a second view of its own (the reference
  # gives it the student's view), the mean-teacher baseline's teacher on the student's view (its
  # default is a second view).
  "abmt_otherview|--config=configs/abmt.py --config.train.teacher_views=(1,)"
  "mean_teacher|--config=configs/mean_teacher.py"
  "mean_teacher_sameview|--config=configs/mean_teacher.py --config.train.teacher_views=(0,)"
  # Only the avg branch trained on pseudo-labels (its max branch only follows BN statistics).
  "abmt_avg_only|--config=configs/abmt.py $kmeans --config.loss.ce_avg=1.0 --config.loss.tri_avg=1.0 --config.loss.ce_max=0.0 --config.loss.soft_ce=0.0 --config.loss.soft_tri=0.0"
)
source experiments/launch.sh
# Generate the larger world once, before parallel runs would all race to make it.
$PY -c "from jaxreid.data import synthetic; print(synthetic.ensure_world(num_test_ids=350, domain_gap=1.0))"
for seed in ${SEEDS:-1 2}; do
  for entry in "${runs[@]}"; do
    name=${entry%%|*}_s$seed; flags=${entry#*|}
    [[ -n "${ONLY:-}" && ! "$name" =~ ${ONLY} ]] && continue
    # $flags / $EXTRA split into words on purpose (no flag value contains spaces).
    launch "$name" "$out" $PY -m jaxreid.main $flags $big ${EXTRA:-} --config.seed=$seed \
      --config.pretrain.seed=$seed --workdir=$out/$name
  done
done
wait_all
$PY experiments/summarise.py "$out"
