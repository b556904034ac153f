#!/usr/bin/env node
// Runs the unmodified JavaScript client `fhir-kit-client` against a Sentinella server.
//
//     node clients/js/suite.js http://127.0.0.1:8080/fhir
//
// Steps: capabilities, CRUD on a Patient (with the codice fiscale check), search with paging, a
// transaction Bundle, $validate and $expand. Each step runs even if an earlier one failed; the
// last line is "N passed, N failed" and the exit code is 1 if any step failed (2 for a bad
// invocation, 3 if the packages are missing).
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const fixtures = join(here, '..', '..', 'tests', 'fixtures');
const CODICE_FISCALE = 'http://hl7.it/sid/codiceFiscale';
// more than one page of PAGE_SIZE: three pages, the last one partial
const PAGE_SIZE = 10;
const PAGED = 25;
// a ValueSet that includes a whole code system of more than 100 codes (the Italian provinces)
const LARGE_VALUE_SET = 'provincia';

let Client;
try {
  ({ Client } = await import('fhir-kit-client'));
} catch (e) {
  console.error(`missing Node.js packages (${e.message}): install them with\n  npm ci --prefix clients/js`);
  process.exit(3);
}

const fixture = (name) => JSON.parse(readFileSync(join(fixtures, name), 'utf8'));
const statusOf = (answer) => Client.httpFor(answer).response?.status;
const errors = (outcome) => (outcome.issue ?? []).filter((i) => ['error', 'fatal'].includes(i.severity));
const expressions = (outcome) => (outcome.issue ?? []).flatMap((i) => i.expression ?? []);

/** A resource as the server answered it: an object of the type expected. */
function resource(answer, type) {
  assert.equal(typeof answer, 'object');
  assert.equal(answer.resourceType, type, JSON.stringify(answer));
  return answer;
}

/** Run a request the server must refuse; return its status and OperationOutcome. */
async function refusal(call) {
  let answer;
  try {
    answer = await call();
  } catch (e) {
    assert.ok(e.response, `not an HTTP answer: ${e}`);
    return { status: e.response.status, outcome: resource(e.response.data, 'OperationOutcome') };
  }
  assert.fail(`the server accepted what it must refuse: ${JSON.stringify(answer)}`);
}

class Suite {
  constructor(base) {
    // development mode: no authorization header
    this.client = new Client({ baseUrl: base.replace(/\/+$/, '') });
    this.tag = randomUUID().replaceAll('-', '').slice(0, 12);
  }

  /** A URL of this server relative to its base. */
  relative(url) {
    const base = `${this.client.baseUrl}/`;
    return url.startsWith(base) ? url.slice(base.length) : url;
  }

  async capabilities() {
    const cs = resource(await this.client.capabilityStatement(), 'CapabilityStatement');
    assert.equal(cs.fhirVersion, '4.0.1');
    const served = new Set(cs.rest[0].resource.map((r) => r.type));
    for (const t of ['Patient', 'Observation', 'ValueSet']) assert.ok(served.has(t), t);
  }

  async crud() {
    const { client } = this;
    const body = fixture('patient-rossi.json');
    const cf = body.identifier[0].value;
    const created = resource(await client.create({ resourceType: 'Patient', body }), 'Patient');
    assert.equal(statusOf(created), 201);
    assert.ok(created.id);
    assert.equal(created.meta.versionId, '1');
    const { id } = created;

    const read = resource(await client.read({ resourceType: 'Patient', id }), 'Patient');
    assert.equal(read.name[0].family, 'Rossi');
    assert.deepEqual(read.identifier, [{ system: CODICE_FISCALE, value: cf }]);
    assert.equal(read.birthDate, '1985-12-10');

    const changed = { ...read, telecom: [{ system: 'phone', value: '+39 011 555 0101', use: 'home' }] };
    const updated = resource(await client.update({ resourceType: 'Patient', id, body: changed }), 'Patient');
    assert.equal(statusOf(updated), 200);
    assert.equal(updated.meta.versionId, '2');
    const vread = await client.vread({ resourceType: 'Patient', id, version: '1' });
    assert.equal(resource(vread, 'Patient').telecom, undefined);

    // the codice fiscale with its check character changed: refused (422) at the element, and
    // nothing stored
    const wrong = cf.slice(0, -1) + (cf.endsWith('A') ? 'B' : 'A');
    const bad = { ...updated, identifier: [{ system: CODICE_FISCALE, value: wrong }] };
    const { status, outcome } = await refusal(() => client.update({ resourceType: 'Patient', id, body: bad }));
    assert.equal(status, 422);
    assert.ok(errors(outcome).length > 0);
    assert.ok(expressions(outcome).includes('Patient.identifier[0].value'), JSON.stringify(outcome));
    assert.equal((await client.read({ resourceType: 'Patient', id })).meta.versionId, '2');

    await client.delete({ resourceType: 'Patient', id });
    const gone = await refusal(() => client.read({ resourceType: 'Patient', id }));
    assert.ok([404, 410].includes(gone.status), gone.status);
  }

  async searchWithPaging() {
    const { client } = this;
    const family = `Paging${this.tag}`;
    const created = new Set();
    for (let i = 0; i < PAGED; i++) {
      const body = { resourceType: 'Patient', gender: 'female', name: [{ family, given: [`N${i}`] }] };
      created.add(resource(await client.create({ resourceType: 'Patient', body }), 'Patient').id);
    }
    let bundle = await client.search({ resourceType: 'Patient', searchParams: { family, _count: PAGE_SIZE } });
    const seen = [];
    let pages = 0;
    while (bundle) {
      pages += 1;
      resource(bundle, 'Bundle');
      assert.equal(bundle.type, 'searchset');
      assert.equal(bundle.total, PAGED);
      const entries = bundle.entry ?? [];
      assert.ok(entries.length <= PAGE_SIZE, entries.length);
      seen.push(...entries.map((e) => resource(e.resource, 'Patient').id));
      assert.ok(bundle.link.some((l) => l.relation === 'self'));
      assert.ok(pages < 10, 'the next links do not end');
      // fhir-kit-client follows the next link as the server wrote it
      bundle = await client.nextPage({ bundle });
    }
    assert.equal(pages, 3);
    assert.equal(new Set(seen).size, PAGED);
    assert.deepEqual(new Set(seen), created);
  }

  async transaction() {
    const { client } = this;
    const body = fixture('antibiogram-transaction.json');
    // fhir-kit-client posts a transaction to the base URL with a trailing slash: POST /fhir/
    const answer = resource(await client.transaction({ body }), 'Bundle');
    assert.equal(answer.type, 'transaction-response');
    assert.equal(answer.entry.length, body.entry.length);
    body.entry.forEach((sent, i) => {
      const { status, location } = answer.entry[i].response;
      // a conditional create may find the Patient an earlier run stored (200, no location)
      if ('ifNoneExist' in sent.request && status.startsWith('200')) return;
      assert.ok(status.startsWith('201'), status);
      // absolute (as a Location header) or relative, both R4
      assert.ok(this.relative(location).startsWith(`${sent.request.url}/`), location);
    });
    const [, reportId] = this.relative(answer.entry.at(-1).response.location).split('/');
    const report = resource(await client.read({ resourceType: 'DiagnosticReport', id: reportId }), 'DiagnosticReport');
    // the urn:uuid references became the ids the server gave
    const refs = report.result.map((r) => r.reference);
    assert.ok(refs.length > 0 && refs.every((r) => r.startsWith('Observation/')), refs);
    for (const ref of refs) {
      resource(await client.resolve({ reference: ref }), 'Observation');
    }
  }

  async validate() {
    const { client } = this;
    const count = async () =>
      (await client.search({ resourceType: 'Observation', searchParams: { _summary: 'count' } })).total;
    const stored = await count();
    const good = {
      resourceType: 'Observation',
      status: 'final',
      code: { coding: [{ system: 'http://loinc.org', code: '8310-5', display: 'Body temperature' }] },
      valueQuantity: { value: 38.5, unit: 'Cel', system: 'http://unitsofmeasure.org', code: 'Cel' },
    };
    // POST /fhir/Observation/$validate with the resource as the body
    const ok = resource(
      await client.operation({ name: '$validate', resourceType: 'Observation', input: good }),
      'OperationOutcome',
    );
    assert.deepEqual(errors(ok), []);

    const bad = { resourceType: 'Observation', status: 'banana', valueString: 'x' };
    const outcome = resource(
      await client.operation({ name: '$validate', resourceType: 'Observation', input: bad }),
      'OperationOutcome',
    );
    assert.ok(errors(outcome).length > 0, JSON.stringify(outcome));
    const at = expressions(outcome);
    assert.ok(at.some((e) => e.startsWith('Observation.status')), at);
    // the missing code: at the element, or at the resource that lacks it
    const missingCode = errors(outcome).some(
      (i) =>
        (i.expression ?? []).some((e) => e === 'Observation' || e.startsWith('Observation.code')) &&
        (i.diagnostics ?? '').includes('code'),
    );
    assert.ok(missingCode, JSON.stringify(outcome));
    assert.equal(await count(), stored, 'nothing was stored');
  }

  async expand() {
    const vs = resource(
      await this.client.operation({
        name: '$expand',
        resourceType: 'ValueSet',
        id: LARGE_VALUE_SET,
        method: 'GET',
        input: { count: PAGE_SIZE },
      }),
      'ValueSet',
    );
    const { expansion } = vs;
    assert.ok(expansion?.timestamp, 'an expansion with its timestamp');
    assert.equal(expansion.contains.length, PAGE_SIZE);
    assert.ok(expansion.total > PAGE_SIZE, expansion.total);
    assert.ok(expansion.contains.every((c) => c.system && c.code));
    assert.equal(new Set(expansion.contains.map((c) => `${c.system}|${c.code}`)).size, PAGE_SIZE);
  }
}

const STEPS = ['capabilities', 'crud', 'searchWithPaging', 'transaction', 'validate', 'expand'];

async function main() {
  if (process.argv.length !== 3) {
    console.error('usage: suite.js BASE_URL (for example http://127.0.0.1:8080/fhir)');
    return 2;
  }
  const suite = new Suite(process.argv[2]);
  let passed = 0;
  let failed = 0;
  for (const name of STEPS) {
    try {
      await suite[name]();
      passed += 1;
      console.log(`ok   js ${name}`);
    } catch (e) {
      failed += 1;
      console.log(`FAIL js ${name}`);
      console.log(e?.response ? `${e.stack}\nanswer ${e.response.status}: ${JSON.stringify(e.response.data)}` : e?.stack ?? e);
    }
  }
  console.log(`js: ${passed} passed, ${failed} failed`);
  return failed ? 1 : 0;
}

process.exitCode = await main();
