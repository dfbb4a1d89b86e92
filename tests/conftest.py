import pytest

pytest_plugins = ["tests.slurm_cluster"]


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """Whatever a test started with tests.mpi_util (mpirun and its ranks, a plain job) and left
    running -- the test failed, timed out or was interrupted in the middle -- is killed, the
    whole process group, before the next test starts."""
    yield
    from tests.mpi_util import kill_all_jobs

    kill_all_jobs()
