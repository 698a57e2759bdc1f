"""Each single-process example under examples/ runs end to end with --quick (in a subprocess, as a
user would run it: `PYTHONPATH=. python examples/X.py --quick`)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

EXAMPLES = {
    # script: (modules it needs, a line its output must contain)
    "reweight_transformer.py": (("transformers", "sklearn"), "AdamW + SAMA reweighting"),
    "label_correction.py": (("sklearn",), "corrected labels"),
    "data_pruning.py": (("sklearn",), "pruned by learned weights"),
    "hf_domain_mixing.py": (("transformers", "accelerate"), "target-domain test loss"),
    "hf_noisy_labels.py": (("transformers", "accelerate"), "SamaTrainer(weighting='sample')"),
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_quick(script):
    needs, expect = EXAMPLES[script]
    for mod in needs:
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"examples/{script} needs `{mod}` (pip install {'scikit-learn' if mod == 'sklearn' else mod})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), "--quick"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert expect in proc.stdout, proc.stdout
