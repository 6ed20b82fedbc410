"""The checkpoint layout: names, iteration directories, the metadata record and the tracker-last publish."""
import json
import os

import pytest

from instella_plugin import checkpoint_layout as layout
from instella_plugin.checkpoint_layout import CheckpointError, CheckpointMeta


def _tensors(folder):
    """Stand-in for what dist_checkpointing writes: its metadata.json."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, layout.DIST_METADATA), "w") as f:
        f.write('{"sharded_backend": "torch_dist"}')
    return folder


def test_iteration_directory_names():
    assert layout.iteration_dir("/s", 100) == os.path.join("/s", "iter_0000100")
    assert layout.parse_iteration_dir("iter_0000100") == 100
    assert layout.parse_iteration_dir("/s/iter_12345678/") == 12345678
    for other in ("iter_0000100.partial", "iter_12", "release", "iter_abcdefg", "xiter_0000001"):
        assert layout.parse_iteration_dir(other) is None, other


def test_list_iterations_ignores_partial_saves_and_files(tmp_path):
    for name in ("iter_0000010", "iter_0000002", "iter_0000020.partial", "release"):
        (tmp_path / name).mkdir()
    (tmp_path / "iter_0000030").write_text("a file")
    assert layout.list_iterations(str(tmp_path)) == [2, 10]
    assert layout.list_iterations(str(tmp_path / "missing")) == []


def test_meta_record_round_trips_and_keeps_the_stored_key_order():
    meta = CheckpointMeta(7, 56, ("model", "optimizer"), {"tp": 2, "pp": 1, "vpp": None, "dp": 1, "cp": 1},
                          {"num_layers": 2}, {"spec": "instella", "rotary_base": 10000.0})
    stored = meta.to_dict()
    assert list(stored) == ["iteration", "consumed_samples", "contents", "layout", "model", "spec", "rotary_base"]
    assert stored["contents"] == ["model", "optimizer"]
    assert CheckpointMeta.from_dict(json.loads(json.dumps(stored))) == meta
    with pytest.raises(ValueError, match=r"repeats the fields \['iteration'\]"):
        CheckpointMeta(1, extra={"iteration": 2})
    weights = CheckpointMeta.weights_only({"num_layers": 2}, 3, spec="instella")
    assert weights.to_dict() == {"iteration": 3, "consumed_samples": 0, "contents": ["model"],
                                 "layout": {"tp": 1, "pp": 1, "vpp": None, "dp": 1, "cp": 1},
                                 "model": {"num_layers": 2}, "spec": "instella"}


def test_publish_writes_meta_then_the_tracker(tmp_path, monkeypatch):
    save = str(tmp_path)
    written = []
    real_replace = os.replace
    monkeypatch.setattr(layout.os, "replace", lambda a, b: (written.append(os.path.basename(b)), real_replace(a, b)))
    meta = CheckpointMeta(5, 40, model={"num_layers": 2}, extra={"args": {"lr": 1e-3}})
    final = layout.publish(save, meta, staging=_tensors(os.path.join(save, "iter_0000005.partial")))
    assert written == [layout.META, layout.TRACKER]
    assert final == layout.iteration_dir(save, 5) and not os.path.exists(final + ".partial")
    assert (tmp_path / layout.TRACKER).read_text() == "5"
    # the bytes the trainer has always written: json.dump(meta, indent=1, default=str), no trailing newline
    assert (tmp_path / "iter_0000005" / layout.META).read_text() == json.dumps(meta.to_dict(), indent=1)
    assert layout.latest_iteration(save) == 5 and layout.read_meta(save) == meta.to_dict()
    assert layout.resolve_checkpoint_dir(save) == final and layout.resolve_checkpoint_dir(final) == final
    assert not [n for n in os.listdir(save) if n.endswith(".tmp")]


def test_a_failed_publish_leaves_the_previous_checkpoint_named(tmp_path, monkeypatch):
    save = str(tmp_path)
    layout.publish(save, CheckpointMeta(1), staging=_tensors(os.path.join(save, "iter_0000001.partial")))
    real_replace = os.replace

    def crash_on_tracker(src, dst):
        if os.path.basename(dst) == layout.TRACKER:
            raise OSError("disk full")
        return real_replace(src, dst)
    monkeypatch.setattr(layout.os, "replace", crash_on_tracker)
    with pytest.raises(OSError, match="disk full"):
        layout.publish(save, CheckpointMeta(2), staging=_tensors(os.path.join(save, "iter_0000002.partial")))
    assert layout.latest_iteration(save) == 1 and layout.read_meta(save)["iteration"] == 1


def test_publish_in_place_release_and_missing_directories(tmp_path):
    save = str(tmp_path)
    _tensors(layout.iteration_dir(save, 0))
    layout.publish(save, CheckpointMeta.weights_only({"num_layers": 2}, 0))  # converter, merge: written in place
    assert layout.latest_iteration(save) == 0
    _tensors(os.path.join(save, layout.RELEASE))
    assert layout.publish(save, CheckpointMeta(9), release=True) == os.path.join(save, "release")
    assert (tmp_path / layout.TRACKER).read_text() == "release" and layout.latest_iteration(save) == 0
    assert layout.read_meta(save)["iteration"] == 9
    with pytest.raises(CheckpointError, match="iter_0000004 does not exist"):
        layout.publish(save, CheckpointMeta(4))


def test_tracker_errors_name_the_problem(tmp_path):
    save = str(tmp_path)
    assert layout.latest_iteration(save) is None
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        layout.resolve_checkpoint_dir(save)
    with pytest.raises(CheckpointError, match="does not exist"):
        layout.resolve_checkpoint_dir(str(tmp_path / "nowhere"))
    (tmp_path / layout.TRACKER).write_text("garbage")
    with pytest.raises(CheckpointError, match="not an iteration number"):
        layout.latest_iteration(save)
    (tmp_path / layout.TRACKER).write_text("3\n")
    _tensors(layout.iteration_dir(save, 3))  # tensors, but no instella_meta.json
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        layout.latest_iteration(save)
