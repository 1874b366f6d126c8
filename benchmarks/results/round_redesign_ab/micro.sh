#!/usr/bin/env bash
PY=/work/main/.venv/bin/python
date
for rep in 1 2 3; do
  for v in after before; do
    root=$([ $v = before ] && echo /tmp/before || echo /work/main)
    (cd /tmp && PYTHONPATH=$root $PY /tmp/ab/micro.py $v 2>&1 | tail -1)
  done
done
date
