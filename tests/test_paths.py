from concurrent.futures import ThreadPoolExecutor

from utils.paths import create_unique_folder


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: create_unique_folder(tmp_path / "runs", "20261124-160104-local"), range(6)))
    assert sorted(folder.name for folder in folders) == sorted(
        ["20261124-160104-local"] + [f"20261124-160104-local-{n}" for n in range(2, 7)])
    assert all(folder.is_dir() and not any(folder.iterdir()) for folder in folders)
