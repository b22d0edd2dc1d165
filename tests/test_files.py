import pytest

from utils.files import replaced_atomically


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "index.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced_atomically(path) as temporary:
            temporary.write_text("half of the ne")
            raise RuntimeError("disk full")
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]


def test_two_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    # Two runs writing the same file at once: each writes its own temporary, the last rename wins whole.
    path = tmp_path / "lr_schedule.png"
    with replaced_atomically(path) as first, replaced_atomically(path) as second:
        assert first != second and first.suffix == second.suffix == ".png"
        first.write_text("first, whole")
        second.write_text("second, whole")
    assert path.read_text() == "first, whole"  # the inner block (second) renamed first, the outer one last
    assert sorted(tmp_path.iterdir()) == [path]
