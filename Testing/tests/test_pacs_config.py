"""PACS node configuration files (TOML and YAML), credentials from the environment, and the
series selector rules. No server needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfusion.errors import InputError, PacsError
from medfusion.pacs.config import load_config, parse_config
from medfusion.pacs.records import SeriesInfo, StudyQuery
from medfusion.pacs.selection import SeriesSelector, select_series, select_sources

TOML = """
default = "main"

[nodes.main.dimse]
host = "pacs.example.org"
port = 104
called_aet = "PACS"
retrieve = "move"
move_destination = "MEDFUSION"
storage_port = 11112
timeout = 12.5

[nodes.main.dicomweb]
url = "https://pacs.example.org/dicom-web/"
username = "fusion"
password_env = "MF_TEST_PW"

[nodes.web.dicomweb]
url = "http://localhost:8042/dicom-web"
token_env = "MF_TEST_TOKEN"
"""

YAML = """
nodes:
  main:
    dimse: {host: 127.0.0.1, port: 4242, called_aet: ORTHANC}
"""


def test_toml_nodes_with_credentials_from_environment(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MF_TEST_PW", "s3cret")
    monkeypatch.setenv("MF_TEST_TOKEN", "tok")
    path = tmp_path / "nodes.toml"
    path.write_text(TOML)
    config = load_config(path)
    main = config.node()  # the default
    assert main.name == "main"
    assert main.dimse is not None and main.dimse.retrieve == "move"
    assert (main.dimse.port, main.dimse.called_aet, main.dimse.calling_aet) == (
        104,
        "PACS",
        "MEDFUSION",
    )
    assert main.dimse.timeout == 12.5 and main.dimse.storage_port == 11112
    assert main.dicomweb is not None
    assert main.dicomweb.url == "https://pacs.example.org/dicom-web"  # trailing slash dropped
    assert (main.dicomweb.username, main.dicomweb.password) == ("fusion", "s3cret")
    assert "s3cret" not in repr(main)  # secrets stay out of reprs (and so out of logs)
    web = config.node("web")
    assert web.dimse is None and web.dicomweb is not None and web.dicomweb.token == "tok"


def test_yaml_single_node_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "nodes.yml"
    path.write_text(YAML)
    node = load_config(path).node()
    assert node.dimse is not None and node.dimse.retrieve == "get" and node.dicomweb is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["nodes"]["a"]["dimse"].update(prot=1), "unknown key"),
        (lambda c: c["nodes"]["a"]["dimse"].update(port=70000), "port"),
        (lambda c: c["nodes"]["a"]["dimse"].update(called_aet="X" * 17), "1-16"),
        (lambda c: c["nodes"]["a"]["dimse"].update(retrieve="move"), "move_destination"),
        (lambda c: c["nodes"]["a"]["dimse"].update(retrieve="fetch"), "'get' or 'move'"),
        (lambda c: c["nodes"]["a"]["dimse"].pop("host"), "missing 'host'"),
        (lambda c: c["nodes"]["a"].update(dicomweb={"url": "ftp://x"}), "http"),
        (
            lambda c: c["nodes"]["a"].update(
                dicomweb={"url": "http://x", "password_env": "NOPE_MF"}
            ),
            "NOPE_MF",
        ),
        (lambda c: c["nodes"]["a"].update(dicomweb={"url": "https://x", "verify_tls": "false"}),
         "verify_tls must be true or false, not 'false'"),  # was taken as true
        (lambda c: c["nodes"]["a"].update(dicomweb={"url": "https://x", "verify_tls": ""}),
         "verify_tls must be true or false"),  # was taken as false: TLS unchecked
        (lambda c: c["nodes"]["a"].update(dicomweb={"url": "https://x",
                                                     "ca_bundle": "/no/such/ca.pem"}),
         "ca_bundle not found: /no/such/ca.pem"),  # was "TLS certificate check failed"
        (lambda c: c.update(default="b"), "default node"),
        (lambda c: c["nodes"].update(b={}), "needs a 'dimse' or a 'dicomweb'"),
    ],
)
def test_bad_configuration_is_a_one_line_input_error(mutate, message: str, monkeypatch) -> None:
    monkeypatch.delenv("NOPE_MF", raising=False)
    config = {"nodes": {"a": {"dimse": {"host": "h", "port": 104, "called_aet": "PACS"}}}}
    mutate(config)
    with pytest.raises(InputError, match=message) as caught:
        parse_config(config)
    assert "\n" not in str(caught.value)


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[nodes.a\nhost=")
    with pytest.raises(InputError, match="cannot parse"):
        load_config(broken)
    wrong = tmp_path / "nodes.ini"
    wrong.write_text("x")
    with pytest.raises(InputError, match=".toml, .yaml or .yml"):
        load_config(wrong)
    two = parse_config({"nodes": {n: {"dicomweb": {"url": "http://x"}} for n in ("a", "b")}})
    with pytest.raises(InputError, match="choose one with --node"):
        two.node()
    with pytest.raises(InputError, match="no PACS node named 'c'"):
        two.node("c")


def test_study_query_validates_dates_and_uids() -> None:
    assert StudyQuery(study_date="20240101-").study_date == "20240101-"
    with pytest.raises(InputError, match="YYYYMMDD"):
        StudyQuery(study_date="2024-01-01")
    with pytest.raises(InputError, match="not a valid DICOM UID"):
        StudyQuery(study_uid="1.2.abc")


STUDY = "1.2.3"
SERIES = [
    SeriesInfo(STUDY, "1.2.3.1", "MR", 3, "T1 MPRAGE", 176),
    SeriesInfo(STUDY, "1.2.3.2", "MR", 4, "T2 FLAIR", 30),
    SeriesInfo(STUDY, "1.2.3.3", "PT", 5, "PET AC FDG", 91),
    SeriesInfo(STUDY, "1.2.3.4", "PT", 6, "PET NAC FDG", 91),
    SeriesInfo(STUDY, "1.2.3.5", "MR", 1003, "MedFusion fusion MR+PT (cnn) not for diagnostic use"),
]


def test_selector_rules_and_uids() -> None:
    assert select_series(SERIES, SeriesSelector.parse("modality=MR,description=t1")).series_uid == (
        "1.2.3.1"
    )
    assert (
        select_series(SERIES, SeriesSelector.parse("modality=pt,number=6")).series_uid == "1.2.3.4"
    )
    assert (
        select_series(SERIES, SeriesSelector.parse("description=^PET AC")).series_uid == "1.2.3.3"
    )
    assert select_series(SERIES, SeriesSelector.parse("1.2.3.2")).modality == "MR"
    reference, others = select_sources(
        SERIES,
        SeriesSelector.parse("modality=MR,description=T1"),
        [SeriesSelector.parse("modality=PT|NM,description=\\bAC")],
    )
    assert (reference.series_uid, [s.series_uid for s in others]) == ("1.2.3.1", ["1.2.3.3"])


def test_selector_failures_name_the_candidates_without_patient_data() -> None:
    with pytest.raises(PacsError, match="2 series .* match modality=PT") as caught:
        select_series(SERIES, SeriesSelector.parse("modality=PT"))
    assert "PET AC FDG" in str(caught.value)
    with pytest.raises(PacsError, match="no series in study 1.2.3 matches modality=CT"):
        select_series(SERIES, SeriesSelector.parse("modality=CT"))
    with pytest.raises(PacsError, match="series 1.2.3.9 not found in study 1.2.3"):
        select_series(SERIES, SeriesSelector.parse("1.2.3.9"))
    # MedFusion's own output is never a source, even when picked by UID.
    with pytest.raises(PacsError, match="not found"):
        select_series(SERIES, SeriesSelector.parse("1.2.3.5"))
    # The same series cannot be both reference and other.
    with pytest.raises(PacsError, match="selected twice"):
        select_sources(SERIES, SeriesSelector.parse("1.2.3.1"), [SeriesSelector.parse("1.2.3.1")])
    for bad in (
        "",
        "modality",
        "colour=red",
        "number=x",
        "description=(",
        "modality=MR,modality=CT",
    ):
        with pytest.raises(InputError):
            SeriesSelector.parse(bad)
