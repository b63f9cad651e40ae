"""Ray job: `ribfrac-ray evaluate`. Arguments are passed through; see `ribfrac-ray evaluate --help`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \
        --runtime-env jobs/runtime_env.yaml -- python jobs/evaluate.py --workdir /abs/path
"""

from _entry import run

run("evaluate")
