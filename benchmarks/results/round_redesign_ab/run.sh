#!/usr/bin/env bash
# Quiet A/B of the round redesign on the final code: before = 7fada6e (/tmp/before), after = main (/work/main).
set -x
PY=/work/main/.venv/bin/python
cd /work/main
date; git -C /work/main log --oneline -1; lscpu | grep -i "model name\|^Flags" | cut -c1-80
$PY /work/main/benchmarks/greedy_identity.py record --out /tmp/ab/greedy_after.json 2>&1 | tail -20
$PY benchmarks/greedy_identity.py compare /tmp/ab/greedy_before.json /tmp/ab/greedy_after.json
date
for rep in 1 2; do
  for v in before after; do
    root=$([ $v = before ] && echo /tmp/before || echo /work/main)
    (cd $root && PYTHONPATH=$root $PY benchmarks/speed.py --no-transformers --dtypes float32 --out /tmp/ab/speed_${v}_$rep 2>&1 | grep -v "it/s\|s/it" | tail -4)
  done
done
date
for v in before after; do
  root=$([ $v = before ] && echo /tmp/before || echo /work/main)
  (cd $root && PYTHONPATH=$root $PY benchmarks/block_length_ab.py --batch-sizes 1,8 --cycles 2 --dtype float32 --out /tmp/ab/bl_$v 2>&1 | grep -v "it/s\|s/it" | tail -12)
done
date
.venv/bin/cascade bench --dataset humaneval --limit 0 --batch-size 16 --max-len 1024 --tag bench_humaneval164 --out /tmp/ab/he --no-progress 2>&1 | tail -5
cmp /tmp/ab/he/bench_humaneval164.csv benchmarks/results/bench_humaneval164.csv && echo "HE CSV byte-identical"
cmp /tmp/ab/he/bench_humaneval164_replay_check.json benchmarks/results/bench_humaneval164_replay_check.json && echo "HE replay check byte-identical"
date
nohup .venv/bin/python benchmarks/record_sets.py --dataset math500 --batch-size 32 > /tmp/rec/math500.log 2>&1 &
echo recorder restarted
