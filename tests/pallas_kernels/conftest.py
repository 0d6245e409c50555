"""Markers of the kernel tests (see pk_cases.py for the compiled-mode switch)."""


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compiled: kernel-vs-reference test that runs the kernel compiled on its own platform when "
                   "KVJAX_TEST_COMPILED=1 (scripts/accelerator_check.sh), in interpret mode otherwise")
