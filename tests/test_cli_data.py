"""`lorakit augment --dedomain` and the argument checks of `lorakit augment` / `lorakit select`."""

import json

from lorakit.cli import main


def _write(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_augment_dedomain_writes_two_stages(tmp_path, capsys):
    hotel = _write(tmp_path / "hotel.jsonl", [f"please book the hotel room with a balcony {i}" for i in range(40)])
    taxi = _write(tmp_path / "taxi.jsonl", [f"please book the taxi to the airport {i}" for i in range(40)])
    out = tmp_path / "amd2g"
    rc = main(["augment", "--dedomain", "--domain", f"hotel={hotel}", "--domain", f"taxi={taxi}",
               "--target", "taxi", "--out-dir", str(out)])
    assert rc == 0
    stage1 = [json.loads(x)["text"] for x in (out / "stage1.jsonl").read_text().splitlines()]
    stage2 = [json.loads(x)["text"] for x in (out / "stage2.jsonl").read_text().splitlines()]
    terms = json.loads((out / "terms.json").read_text())
    assert len(stage1) == 80 and len(stage2) == 40
    assert stage2[0] == "please book the taxi to the airport 0"  # stage 2 is the original target data
    assert "taxi" in terms["taxi"] and "hotel" in terms["hotel"]
    assert not any("taxi" in t or "hotel" in t for t in stage1)  # domain terms removed ...
    assert all(t.startswith("please book") for t in stage1)  # ... shared words kept


def test_augment_and_select_refuse_missing_arguments(tmp_path, capsys):
    assert main(["augment", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "needs --seeds" in capsys.readouterr().err
    assert main(["augment", "--dedomain", "--domain", "nodelimiter", "--target", "a",
                 "--out-dir", str(tmp_path)]) == 2
    assert "NAME=PATH" in capsys.readouterr().err
