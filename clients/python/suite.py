#!/usr/bin/env python3
"""Runs the unmodified Python client `fhirpy` against a Sentinella server and parses every answer
with `fhir.resources` 6.4.0, whose default models are R4 (4.0.1): an answer that is not valid R4
fails its step.

    python3 clients/python/suite.py http://127.0.0.1:8080/fhir

Steps: capabilities, CRUD on a Patient (with the codice fiscale check), search with paging, a
transaction Bundle, $validate and $expand. Each step runs even if an earlier one failed; the last
line is "N passed, N failed" and the exit code is 1 if any step failed (2 for a bad invocation,
3 if the packages are missing).
"""

import json
import sys
import traceback
import uuid
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().with_name("requirements.txt")

try:
    import fhir.resources
    from fhir.resources import construct_fhir_element
    from fhirpy import SyncFHIRClient
    from fhirpy.base.exceptions import OperationOutcome, ResourceNotFound
except ImportError as e:
    print(
        f"missing Python packages ({e}): install them with\n"
        f"  python3 -m venv clients/python/.venv && "
        f"clients/python/.venv/bin/pip install -r {REQUIREMENTS}",
        file=sys.stderr,
    )
    sys.exit(3)

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
CODICE_FISCALE = "http://hl7.it/sid/codiceFiscale"
# more than one page of PAGE_SIZE: three pages, the last one partial
PAGE_SIZE = 10
PAGED = 25
# a ValueSet that includes a whole code system of more than 100 codes (the Italian provinces)
LARGE_VALUE_SET = "provincia"


def r4(data):
    """Parse an answer as the R4 resource it says it is (fhir.resources raises if it is not)."""
    plain = json.loads(json.dumps(data))
    assert isinstance(plain, dict) and "resourceType" in plain, f"not a resource: {plain!r}"
    return construct_fhir_element(plain["resourceType"], plain)


def outcome_of(error):
    """The OperationOutcome a refused request answered, parsed as R4."""
    if isinstance(error, OperationOutcome):
        body = error.resource
    else:
        body = json.loads(str(error))
    parsed = r4(body)
    assert parsed.resource_type == "OperationOutcome", body
    return parsed


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def expect_refusal(call):
    """Run a call the server must refuse; return the OperationOutcome it answered."""
    try:
        call()
    except (OperationOutcome, ResourceNotFound) as e:
        return outcome_of(e)
    raise AssertionError("the server accepted what it must refuse")


def errors(outcome):
    return [i for i in outcome.issue if i.severity in ("error", "fatal")]


def expressions(outcome):
    return [e for i in outcome.issue for e in (i.expression or [])]


class Suite:
    def __init__(self, base):
        self.base = base.rstrip("/")
        # development mode: no authorization; fhirpy sends Accept: application/fhir+json
        self.client = SyncFHIRClient(self.base, requests_config={"timeout": 60})
        # fhirpy's count() adds `_totalMethod=count` (an Aidbox parameter, not R4), which this
        # server refuses as an unknown search parameter unless told to be lenient (R4's
        # `Prefer: handling=lenient`): a client configured so, for count() only
        self.lenient = SyncFHIRClient(
            self.base, extra_headers={"Prefer": "handling=lenient"}, requests_config={"timeout": 60}
        )
        self.tag = uuid.uuid4().hex[:12]

    def relative(self, url):
        """A URL of this server relative to its base."""
        return url[len(self.base) + 1 :] if url.startswith(self.base + "/") else url

    def total(self, resource_type):
        """How many resources of a type are stored (`_summary=count`)."""
        bundle = r4(self.client.resources(resource_type).search(_summary="count").fetch_raw())
        return bundle.total

    def capabilities(self):
        cs = r4(self.client.execute("metadata", method="get"))
        assert cs.resource_type == "CapabilityStatement"
        assert cs.fhirVersion == "4.0.1", cs.fhirVersion
        rest = cs.rest[0]
        served = {r.type for r in rest.resource}
        assert {"Patient", "Observation", "ValueSet"} <= served, served

    def crud(self):
        client = self.client
        data = fixture("patient-rossi.json")
        cf = data["identifier"][0]["value"]
        patient = client.resource("Patient", **data)
        patient.save()  # POST: no id yet
        assert patient.id, "the server gave the Patient an id"
        created = r4(patient.serialize())
        assert created.meta.versionId == "1", created.meta.versionId

        read = r4(client.get("Patient", patient.id))
        assert read.name[0].family == "Rossi"
        assert [(i.system, i.value) for i in read.identifier] == [(CODICE_FISCALE, cf)]
        assert read.birthDate.isoformat() == "1985-12-10"

        patient["telecom"] = [{"system": "phone", "value": "+39 011 555 0101", "use": "home"}]
        patient.save()  # PUT to its id
        updated = r4(client.get("Patient", patient.id))
        assert updated.meta.versionId == "2", updated.meta.versionId
        assert updated.telecom[0].value == "+39 011 555 0101"

        # the same update with the codice fiscale's check character changed is refused, with
        # the element that is wrong, and nothing is stored
        bad = json.loads(json.dumps(patient.serialize()))
        bad["identifier"][0]["value"] = cf[:-1] + ("A" if cf[-1] != "A" else "B")
        oo = expect_refusal(lambda: client.resource("Patient", **bad).save())
        assert "Patient.identifier[0].value" in expressions(oo), expressions(oo)
        assert errors(oo), oo.json()
        assert r4(client.get("Patient", patient.id)).meta.versionId == "2"

        patient.delete()
        gone = expect_refusal(lambda: client.get("Patient", patient.id))
        assert gone.issue, gone.json()

    def search_with_paging(self):
        client = self.client
        family = f"Paging{self.tag}"
        created = set()
        for i in range(PAGED):
            p = client.resource("Patient", name=[{"family": family, "given": [f"N{i:02}"]}], gender="female")
            p.save()
            r4(p.serialize())
            created.add(p.id)
        search = client.resources("Patient").search(family=family).limit(PAGE_SIZE)

        # the pages as they come, each a valid R4 searchset, followed by their next links
        seen, pages = [], 0
        bundle = r4(search.fetch_raw())
        while True:
            pages += 1
            assert bundle.type == "searchset", bundle.type
            assert bundle.total == PAGED, bundle.total
            entries = bundle.entry or []
            assert len(entries) <= PAGE_SIZE, len(entries)
            seen += [e.resource.id for e in entries]
            links = {l.relation: l.url for l in bundle.link}
            assert "self" in links, links
            if "next" not in links:
                break
            assert pages < 10, "the next links do not end"
            bundle = r4(client.execute(links["next"], method="get"))
        assert pages == 3, pages
        assert len(seen) == len(set(seen)) == PAGED, seen
        assert set(seen) == created

        # and fhirpy's own iteration, which follows the same links
        assert {p.id for p in search} == created
        assert self.lenient.resources("Patient").search(family=family).count() == PAGED

    def transaction(self):
        client = self.client
        bundle = fixture("antibiogram-transaction.json")
        # fhirpy posts a transaction to the base URL with a trailing slash: POST /fhir/
        answer = r4(client.execute("/", method="post", data=bundle))
        assert answer.type == "transaction-response", answer.type
        assert len(answer.entry) == len(bundle["entry"])
        for sent, got in zip(bundle["entry"], answer.entry):
            status = got.response.status
            conditional = "ifNoneExist" in sent["request"]
            # a conditional create may find the Patient an earlier run stored (200, no location)
            if conditional and status.startswith("200"):
                continue
            assert status.startswith("201"), status
            # absolute (as a Location header) or relative, both R4
            location = self.relative(got.response.location)
            assert location.startswith(sent["request"]["url"] + "/"), got.response.location
        report_at = self.relative(answer.entry[-1].response.location).split("/_history")[0]
        report = r4(client.execute(report_at, method="get"))
        assert report.resource_type == "DiagnosticReport"
        # the urn:uuid references became the ids the server gave
        refs = [r.reference for r in report.result]
        assert refs and all(r.startswith("Observation/") for r in refs), refs
        for ref in refs:
            assert r4(client.execute(ref, method="get")).resource_type == "Observation"

    def validate(self):
        client = self.client
        stored = self.total("Observation")
        good = client.resource(
            "Observation",
            status="final",
            code={"coding": [{"system": "http://loinc.org", "code": "8310-5", "display": "Body temperature"}]},
            valueQuantity={"value": 38.5, "unit": "Cel", "system": "http://unitsofmeasure.org", "code": "Cel"},
        )
        # fhirpy's is_valid: POST /fhir/Observation/$validate with the resource as the body
        assert good.is_valid(), "a valid Observation"
        oo = r4(client.execute("Observation/$validate", method="post", data=good.serialize()))
        assert not errors(oo), oo.json()

        bad = client.resource("Observation", status="banana", valueString="x")
        assert not bad.is_valid(), "status 'banana' and no code"
        oo = r4(client.execute("Observation/$validate", method="post", data=bad.serialize()))
        assert errors(oo), oo.json()
        at = expressions(oo)
        assert any(e.startswith("Observation.status") for e in at), at
        # the missing code: at the element, or at the resource that lacks it
        assert any(
            any(e == "Observation" or e.startswith("Observation.code") for e in (i.expression or []))
            and "code" in (i.diagnostics or "")
            for i in errors(oo)
        ), oo.json()
        # nothing was stored
        assert self.total("Observation") == stored

    def expand(self):
        vs = r4(
            self.client.execute(
                f"ValueSet/{LARGE_VALUE_SET}/$expand", method="get", params={"count": PAGE_SIZE}
            )
        )
        assert vs.resource_type == "ValueSet"
        expansion = vs.expansion
        assert expansion is not None and expansion.timestamp is not None
        contains = expansion.contains or []
        assert len(contains) == PAGE_SIZE, len(contains)
        assert expansion.total is not None and expansion.total > PAGE_SIZE, expansion.total
        assert all(c.system and c.code for c in contains), contains
        assert len({(c.system, c.code) for c in contains}) == PAGE_SIZE


STEPS = ["capabilities", "crud", "search_with_paging", "transaction", "validate", "expand"]


def main():
    if len(sys.argv) != 2:
        print("usage: suite.py BASE_URL (for example http://127.0.0.1:8080/fhir)", file=sys.stderr)
        return 2
    assert fhir.resources.__version__ == "6.4.0" and fhir.resources.__fhir_version__ == "4.0.1"
    suite = Suite(sys.argv[1])
    passed = failed = 0
    for name in STEPS:
        try:
            getattr(suite, name)()
        except Exception:  # noqa: BLE001 - every failure is reported, then the next step runs
            failed += 1
            print(f"FAIL python {name}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   python {name}")
        sys.stdout.flush()
    print(f"python: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
