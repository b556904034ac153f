-- Versioned resource storage. Bodies are kept as the exact JSON text the server produced (decimal
-- precision and key order are data in FHIR). Times are microseconds since the Unix epoch (UTC).
CREATE TABLE resources (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    INTEGER NOT NULL,
    last_updated  INTEGER NOT NULL,
    deleted       BOOLEAN NOT NULL,
    body          TEXT,
    PRIMARY KEY (resource_type, id)
);
CREATE INDEX resources_by_last_updated ON resources (resource_type, last_updated);

CREATE TABLE resource_versions (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    version_id    INTEGER NOT NULL,
    last_updated  INTEGER NOT NULL,
    deleted       BOOLEAN NOT NULL,
    method        TEXT NOT NULL,
    body          TEXT,
    PRIMARY KEY (resource_type, id, version_id)
);
CREATE INDEX resource_versions_by_type_time ON resource_versions (resource_type, last_updated);
CREATE INDEX resource_versions_by_time ON resource_versions (last_updated);

-- One row per search-parameter value of the current version of each resource.
-- Tokens: system + value(code); strings: normalised value; uris and references (`Type/id`): value;
-- dates: [lo, hi) in microseconds.
CREATE TABLE search_index (
    resource_type TEXT NOT NULL,
    id            TEXT NOT NULL,
    param         TEXT NOT NULL,
    system        TEXT,
    value         TEXT,
    lo            INTEGER,
    hi            INTEGER
);
-- partial indexes: a row is either a text value or a date range, never both
CREATE INDEX search_index_by_value ON search_index (resource_type, param, value, system) WHERE value IS NOT NULL;
CREATE INDEX search_index_by_date ON search_index (resource_type, param, lo, hi) WHERE lo IS NOT NULL;
CREATE INDEX search_index_by_resource ON search_index (resource_type, id);
