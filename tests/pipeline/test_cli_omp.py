"""The `msdn` command sets OMP_WAIT_POLICY=PASSIVE before torch loads (bench/omp_policy.py measured
why), and a user's own setting wins."""
import os
import subprocess
import sys

PROBE = ("import sys, cli; assert 'torch' not in sys.modules, 'cli imported torch before the policy'; "
         "import os; print(os.environ['OMP_WAIT_POLICY'])")


def probe(**env):
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60,
                          env={**base, **env})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_msdn_waits_passively_by_default():
    assert probe() == "PASSIVE"


def test_the_users_policy_wins():
    assert probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
