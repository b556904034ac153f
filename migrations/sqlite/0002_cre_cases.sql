-- CRE surveillance state (DOMAIN.md §1).
-- cre_isolates: every blood-culture isolate that has ever met the case definition, with its
-- deduplication key (patient identity from the codice fiscale, species, calendar year in Europe/Rome)
-- and whether it meets it now (a correction can take it back).
CREATE TABLE cre_isolates (
    isolate_id TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    species    TEXT NOT NULL,
    year       INTEGER NOT NULL,
    ref_time   BIGINT NOT NULL,
    qualifies  BOOLEAN NOT NULL
);
CREATE INDEX cre_isolates_by_key ON cre_isolates (identity, species, year, ref_time);

-- cre_cases: one row per case notification. At most one active case per key: the unique index is
-- what makes two racing requests (or two server processes) produce one case.
CREATE TABLE cre_cases (
    case_id    TEXT PRIMARY KEY,
    identity   TEXT NOT NULL,
    species    TEXT NOT NULL,
    year       INTEGER NOT NULL,
    isolate_id TEXT NOT NULL,
    active     BOOLEAN NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX cre_cases_one_active_per_key ON cre_cases (identity, species, year) WHERE active;
