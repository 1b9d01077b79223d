import json

from wvdata import info, open_dataset
from wvdata.cli import main


def test_build_and_info_count_every_input(webvision_crawl, webvision_dataset, capsys):
    ds = open_dataset(webvision_dataset)
    for split in ("train", "val", "test"):
        assert ds.samples(split).height + ds.errors(split).height == webvision_crawl.count(split)
    assert main(["info", str(webvision_dataset)]) == 0
    assert "train" in capsys.readouterr().out
    assert info(webvision_dataset)["classes"] == 10
    manifest = json.loads((webvision_dataset / "dataset.json").read_text())
    assert list(manifest["splits"]) == ["train", "val", "test"]
