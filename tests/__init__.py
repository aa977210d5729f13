"""The test suite as a package: tests/<package>/test_<module>.py mirrors trpr/<package>/<module>.py, so two
folders may hold the same file name (tests.kernels.test_losses, tests.modeling.test_losses); docs/design.md, "Tests"."""
