import os

# As `msdn` itself does (cli.py), before torch loads: spinning OpenMP waiters cost the suite several
# times its CPU time on a 2-core machine (a folder-dataset test: 250 CPU-s spinning, 73 passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.fixtures.shared_data import find_shared_data

# Two cores on CI: keep torch from oversubscribing when pytest runs several heavy tests.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_data():
    """The real data folder (../shared/data or $MSDN_SHARED_DATA). Missing: a failure under CI=true
    (CI always has it), elsewhere a skip that says why (a clone of the repository alone has no data)."""
    try:
        return find_shared_data()
    except FileNotFoundError as err:
        if os.environ.get("CI") == "true":
            pytest.fail(str(err))
        pytest.skip(f"needs the real test data: {err}")


def pytest_terminal_summary(terminalreporter):
    """The counts of the bad-input tables and the fault suite (tests/fixtures/verdicts.py), when they ran."""
    from tests.fixtures.verdicts import VERDICTS, summary
    line = summary()
    if line is not None:
        terminalreporter.write_sep("-", line)
        others = sorted(case for case, verdict in VERDICTS.items() if verdict != "one-line")
        if others:
            terminalreporter.write_line("not one line: " + ", ".join(f"{c} ({VERDICTS[c]})" for c in others))


def pytest_runtest_logreport(report):
    """Faults another module repeats (tests/fixtures/faults.py references their tests): count their outcome."""
    if report.when != "call":
        return
    from tests.fixtures.faults import FAULT_SUITE, FAULTS
    from tests.fixtures.verdicts import record
    for fault in FAULTS:
        if fault.test == report.nodeid and not fault.test.startswith(FAULT_SUITE):
            record(f"fault:{fault.id}", "one-line" if report.passed else "other")
