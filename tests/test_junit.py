"""`--junit FILE` and `--github-summary`: what a CI system reads.

The XML is validated with xmlschema against JUNIT_XSD: the structure of the Jenkins xunit `junit-10` schema that
junitparser's xunit2 flavour (the one parity writes with) documents itself as. The upstream .xsd file is not
vendored (it is another project's file, and the package registry serves no distribution that ships it); this
schema is written from junitparser.xunit2's element and attribute model: the same elements, their nesting and
order, required names and counts, numeric types. It is shown to reject a document that breaks it.
"""

from __future__ import annotations

import argparse

import pytest

import parity
from parity.errors import ParityError
from parity.report.junit import github_summary, junit_xml, section_case, write_github_summary, write_junit

JUNIT_XSD = """<?xml version="1.0" encoding="UTF-8"?>
<xs:schema xmlns:xs="http://www.w3.org/2001/XMLSchema" elementFormDefault="qualified">
  <xs:simpleType name="seconds"><xs:restriction base="xs:decimal"><xs:minInclusive value="0"/></xs:restriction>
  </xs:simpleType>
  <xs:complexType name="result" mixed="true">
    <xs:attribute name="message" type="xs:string"/>
    <xs:attribute name="type" type="xs:string"/>
  </xs:complexType>
  <xs:element name="properties">
    <xs:complexType><xs:sequence>
      <xs:element name="property" maxOccurs="unbounded">
        <xs:complexType>
          <xs:attribute name="name" type="xs:string" use="required"/>
          <xs:attribute name="value" type="xs:string" use="required"/>
        </xs:complexType>
      </xs:element>
    </xs:sequence></xs:complexType>
  </xs:element>
  <xs:element name="testcase">
    <xs:complexType>
      <xs:sequence>
        <xs:choice minOccurs="0" maxOccurs="unbounded">
          <xs:element name="skipped" type="result"/>
          <xs:element name="error" type="result"/>
          <xs:element name="failure" type="result"/>
          <xs:element name="rerunFailure" type="result"/>
          <xs:element name="rerunError" type="result"/>
          <xs:element name="flakyFailure" type="result"/>
          <xs:element name="flakyError" type="result"/>
        </xs:choice>
        <xs:element ref="properties" minOccurs="0"/>
        <xs:element name="system-out" type="xs:string" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element name="system-err" type="xs:string" minOccurs="0" maxOccurs="unbounded"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="classname" type="xs:string"/>
      <xs:attribute name="time" type="seconds"/>
      <xs:attribute name="assertions" type="xs:string"/>
      <xs:attribute name="status" type="xs:string"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuite">
    <xs:complexType>
      <xs:sequence>
        <xs:element ref="properties" minOccurs="0"/>
        <xs:element ref="testcase" minOccurs="0" maxOccurs="unbounded"/>
        <xs:element name="system-out" type="xs:string" minOccurs="0"/>
        <xs:element name="system-err" type="xs:string" minOccurs="0"/>
      </xs:sequence>
      <xs:attribute name="name" type="xs:string" use="required"/>
      <xs:attribute name="tests" type="xs:nonNegativeInteger" use="required"/>
      <xs:attribute name="failures" type="xs:nonNegativeInteger"/>
      <xs:attribute name="errors" type="xs:nonNegativeInteger"/>
      <xs:attribute name="skipped" type="xs:nonNegativeInteger"/>
      <xs:attribute name="time" type="seconds"/>
      <xs:attribute name="timestamp" type="xs:string"/>
      <xs:attribute name="hostname" type="xs:string"/>
      <xs:attribute name="id" type="xs:string"/>
      <xs:attribute name="package" type="xs:string"/>
      <xs:attribute name="file" type="xs:string"/>
      <xs:attribute name="log" type="xs:string"/>
      <xs:attribute name="url" type="xs:string"/>
      <xs:attribute name="version" type="xs:string"/>
      <xs:attribute name="group" type="xs:string"/>
    </xs:complexType>
  </xs:element>
  <xs:element name="testsuites">
    <xs:complexType>
      <xs:sequence><xs:element ref="testsuite" minOccurs="0" maxOccurs="unbounded"/></xs:sequence>
      <xs:attribute name="name" type="xs:string"/>
      <xs:attribute name="tests" type="xs:nonNegativeInteger"/>
      <xs:attribute name="failures" type="xs:nonNegativeInteger"/>
      <xs:attribute name="errors" type="xs:nonNegativeInteger"/>
      <xs:attribute name="time" type="seconds"/>
      <xs:attribute name="disabled" type="xs:nonNegativeInteger"/>
    </xs:complexType>
  </xs:element>
</xs:schema>
"""

CASES = ["structure", "layers", "loss default", "loss small_box", "loss empty_image", "loss no_boxes", "gradients",
         "bias init"]


@pytest.fixture(scope="module")
def schema():
    xmlschema = pytest.importorskip("xmlschema", reason="xmlschema validates the JUnit XML (pip install xmlschema)")
    return xmlschema.XMLSchema(JUNIT_XSD)


@pytest.fixture(scope="module")
def reports(fixtures_dir):
    reference = fixtures_dir / "yolo11-narrow-nc80-96"
    return {"clean": parity.compare(reference), "missing-sigmoid": parity.compare(reference, inject="missing-sigmoid")}


def test_sections_map_to_one_case_each():
    assert [section_case(s) for s in ("structure", "isolated", "chained", "loss/default", "loss/default end-to-end",
                                      "loss/small_box gradients", "isolated/23")] == \
        ["structure", "layers", "layers", "loss default", "loss default", "gradients", "layers"]


def test_clean_report_is_valid_junit_with_no_failures(schema, reports, tmp_path):
    from junitparser.xunit2 import JUnitXml

    path = write_junit(reports["clean"], tmp_path / "clean.xml")
    schema.validate(str(path))
    (suite,) = list(JUnitXml.fromfile(str(path)))
    assert [case.name for case in suite] == CASES
    assert suite.tests == len(CASES) and suite.failures == 0 and suite.errors == 0
    assert all(case.is_passed for case in suite)


def test_failing_rows_are_failures_of_their_case(schema, reports, tmp_path):
    from junitparser.xunit2 import JUnitXml

    report = reports["missing-sigmoid"]
    path = write_junit(report, tmp_path / "bad.xml")
    schema.validate(str(path))
    (suite,) = list(JUnitXml.fromfile(str(path)))
    failed = {case.name: case.result[0] for case in suite if not case.is_passed}
    assert set(failed) == {"loss default", "loss small_box", "loss empty_image", "loss no_boxes", "gradients",
                           "diagnosis"}
    assert suite.failures == len(failed)
    default_rows = [r for r in report.failed_rows if section_case(r.section) == "loss default"]
    assert failed["loss default"].message.startswith(f"{len(default_rows)} of ")
    assert "loss.default.assign.pd_scores: max|d| 14.4" in failed["loss default"].text
    assert failed["diagnosis"].text.startswith("missing-sigmoid @ loss stage assign: the assigner receives raw")
    properties = {p.name: p.value for p in suite.properties()}
    assert properties["verdict"] == "divergence" and properties["candidate"] == "builtin"


def test_the_schema_rejects_what_breaks_it(schema, reports):
    document = junit_xml(reports["clean"])
    text = document.tostring().decode() if hasattr(document, "tostring") else None
    import xml.etree.ElementTree as ET

    root = ET.fromstring(text) if text else document._elem
    assert schema.is_valid(root)
    next(root.iter("testcase")).attrib.pop("name")
    assert not schema.is_valid(root), "a test case without a name is not JUnit"


def test_github_summary_is_markdown_that_names_the_bug(reports, tmp_path):
    text = github_summary(reports["missing-sigmoid"])
    assert text.startswith("### :x: yolo-parity: DIVERGENCE")
    assert "| ❌ loss default | 41 | 23 |" in text and "| ✅ layers | 52 | 0 |" in text
    assert "| error | `missing-sigmoid` | loss stage assign |" in text
    path = tmp_path / "summary.md"
    write_github_summary(reports["clean"], path)
    write_github_summary(reports["missing-sigmoid"], path)  # appended, as GitHub's step summary file is
    assert path.read_text().count("### ") == 2


def test_github_summary_without_a_path_uses_the_step_summary_file(monkeypatch, tmp_path):
    from parity.cli.main import build_parser
    from parity.cli.compare import report_files

    args = build_parser().parse_args(["compare", "--github-summary"])
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "step.md"))
    assert report_files(args).github_summary == str(tmp_path / "step.md")
    monkeypatch.delenv("GITHUB_STEP_SUMMARY")
    with pytest.raises(ParityError, match="GITHUB_STEP_SUMMARY, which is not set"):
        report_files(args)
    assert report_files(argparse.Namespace(json_out=None, github_summary="x.md")).github_summary == "x.md"
