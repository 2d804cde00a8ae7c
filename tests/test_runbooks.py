"""Every alert tells the on-call where to read what to do: its runbook_url is the one runbooks page
of deploy/spec.py (RUNBOOK_URL) plus a section of docs/operating.md that exists."""

from __future__ import annotations

import re

import pytest

from deploy.monitoring import prometheus_rule
from deploy.spec import ENVIRONMENTS, RUNBOOK_URL
from tests.docs_examples import anchors
from tests.serving import PROJECT

RUNBOOKS = PROJECT / "docs" / "operating.md"


def alerts(env: str) -> list[dict]:
    return [rule for group in prometheus_rule(ENVIRONMENTS[env])["spec"]["groups"] for rule in group["rules"]
            if "alert" in rule]


@pytest.mark.parametrize("env", list(ENVIRONMENTS))
def test_every_alert_links_to_its_section_of_the_runbooks(env):
    sections = anchors(RUNBOOKS)
    for alert in alerts(env):
        url = alert["annotations"].get("runbook_url")
        assert url, f"{alert['alert']} has no runbook_url"
        page, _, section = url.partition("#")
        assert page == RUNBOOK_URL, f"{alert['alert']}: {url} is not built from deploy/spec.py's RUNBOOK_URL"
        assert section in sections, f"{alert['alert']}: docs/operating.md has no heading for #{section}"


def test_the_runbooks_page_has_a_section_for_each_alert_and_no_other():
    """A section titled like an alert (CTT...) whose alert was renamed or removed would mislead."""
    titled = set(re.findall(r"^#+ (CTT\w+)\s*$", RUNBOOKS.read_text(encoding="utf-8"), flags=re.M))
    assert titled == {alert["alert"] for alert in alerts("production")}


def test_the_runbooks_page_is_an_absolute_link_without_a_section():
    assert re.fullmatch(r"https://[^\s#]+", RUNBOOK_URL), RUNBOOK_URL
