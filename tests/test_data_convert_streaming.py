"""``instella data convert`` streams: a 10x larger input costs no more peak memory (one process converts
a small input then the large one; its peak RSS does not grow) and the output holds every row."""
import json
import subprocess
import sys

ROW_CHARS = 2000


def _write(path, rows):
    text = "x" * ROW_CHARS
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                             {"role": "assistant", "content": text}]}) + "\n")
    return str(path)


def _peak_rss_mb(small, big, tmp_path):
    """One process converts the small input, then the big one; peak RSS after each (it never goes down)."""
    code = ("import resource, sys\nfrom instella_plugin.data.convert import convert\n"
            "for inp, out in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):\n"
            "    c = convert('smoltalk', out, [inp], progress_every=0)\n"
            "    print(c.kept, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    args = [small, str(tmp_path / "s.jsonl"), big, str(tmp_path / "b.jsonl")]
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return [(int(k), float(m)) for k, m in (line.split() for line in res.stdout.splitlines())]


def test_peak_memory_is_flat_in_the_input_size(tmp_path):
    small, big = 2_000, 20_000   # about 4 MB and 40 MB of JSONL
    (kept_small, rss_small), (kept_big, rss_big) = _peak_rss_mb(
        _write(tmp_path / "small.jsonl", small), _write(tmp_path / "big.jsonl", big), tmp_path)
    print(f"peak RSS: {rss_small:.0f} MB after {small} rows, {rss_big:.0f} MB after {big} more rows")
    assert (kept_small, kept_big) == (small, big)
    with open(tmp_path / "b.jsonl", encoding="utf-8") as f:
        assert sum(1 for _ in f) == big
    # holding the big input would add its ~40 MB (and more as Python objects)
    assert rss_big - rss_small < 15
