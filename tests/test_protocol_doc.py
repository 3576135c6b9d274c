"""docs/protocol.md: its generated sections match the code they are generated from."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleet import protocol_doc
from schemas.catalogue import replace_sections
from schemas.events import EventData


def test_generated_sections_are_fresh() -> None:
    text = protocol_doc.DOC.read_text(encoding="utf-8")
    assert protocol_doc.render(text) == text, (
        f"{protocol_doc.DOC} is stale: the schemas, config models, streams or errors "
        f"changed. Regenerate it with `{protocol_doc.REGENERATE}` and commit the result."
    )


def test_every_event_type_and_config_key_is_in_the_document() -> None:
    from agentd.config import AgentConfig
    from master.config import MasterConfig
    from schemas.registry import default_registry

    text = protocol_doc.DOC.read_text(encoding="utf-8")
    for event_type in default_registry.known_types():
        assert f"#### `{event_type}` v" in text
    for name in [*AgentConfig.model_fields, *MasterConfig.model_fields]:
        assert f"| `{name}` |" in text


def test_a_new_field_makes_the_document_stale() -> None:
    """The freshness check is not vacuous: a changed model changes the catalogue."""
    from schemas.catalogue import event_catalogue

    class ProbeHappened(EventData):
        """A probe."""

        TYPE = "probe.happened"
        size: int

    class ProbeHappenedV2(EventData):
        """A probe."""

        TYPE = "probe.happened"
        VERSION = 2
        size: int
        colour: str = "red"

    one, two = event_catalogue([ProbeHappened]), event_catalogue([ProbeHappenedV2])
    assert one != two
    assert '`colour` | str | `"red"`' in two
    assert "`probe.happened` v2" in two


def test_replacing_sections_keeps_the_hand_written_text() -> None:
    text = "intro\n<!-- generated:a -->\nold\n<!-- /generated:a -->\noutro\n"
    assert replace_sections(text, {"a": "new"}) == (
        "intro\n<!-- generated:a -->\nnew\n<!-- /generated:a -->\noutro\n"
    )


def test_missing_or_unknown_markers_are_errors() -> None:
    with pytest.raises(ValueError, match="no markers for generated section"):
        replace_sections("no markers here\n", {"a": "x"})
    with pytest.raises(ValueError, match="not known"):
        replace_sections("<!-- generated:b -->\n<!-- /generated:b -->\n", {})


def test_the_check_command_says_how_to_regenerate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    stale = tmp_path / "protocol.md"
    stale.write_text(protocol_doc.DOC.read_text().replace("| `max_jobs` |", "| `max_job` |", 1))
    assert protocol_doc.main([str(stale)]) == 1
    assert protocol_doc.REGENERATE in capsys.readouterr().err
    assert protocol_doc.main([str(stale), "--write"]) == 0
    assert stale.read_text() == protocol_doc.DOC.read_text()
    assert protocol_doc.main([str(stale)]) == 0
