"""``instella data convert`` streams: a 10x larger input costs no more peak memory (each size converted
in a fresh process, peak RSS compared) and the output holds every row."""
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


def _peak_rss_mb(inp, out):
    code = ("import resource, sys\nfrom instella_plugin.data.convert import convert\n"
            "c = convert('smoltalk', sys.argv[2], [sys.argv[1]], progress_every=0)\n"
            "print(c.kept, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    res = subprocess.run([sys.executable, "-c", code, inp, out], capture_output=True, text=True, check=True)
    kept, peak = res.stdout.split()
    return int(kept), float(peak)


def test_peak_memory_is_flat_in_the_input_size(tmp_path):
    small, big = 2_000, 20_000   # about 4 MB and 40 MB of JSONL
    kept_small, rss_small = _peak_rss_mb(_write(tmp_path / "small.jsonl", small), str(tmp_path / "s.jsonl"))
    kept_big, rss_big = _peak_rss_mb(_write(tmp_path / "big.jsonl", big), str(tmp_path / "b.jsonl"))
    print(f"peak RSS: {rss_small:.0f} MB for {small} rows, {rss_big:.0f} MB for {big} rows")
    assert (kept_small, kept_big) == (small, big)
    with open(tmp_path / "b.jsonl", encoding="utf-8") as f:
        assert sum(1 for _ in f) == big
    # holding the big input would add its ~40 MB (and more as Python objects)
    assert rss_big - rss_small < 15
