-- What rule sets remember between writes (D.M. 1990 reports, cases, episodes, outbreaks): JSON
-- records under a key unique per rule set, so racing transactions cannot both claim one, and
-- tags (indexed lookup keys such as a patient identity or a community) to find them again
-- without scanning.
CREATE TABLE rule_state (
    rule_set TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (rule_set, key)
);

CREATE TABLE rule_state_tags (
    rule_set TEXT NOT NULL,
    tag TEXT NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (rule_set, tag, key)
);

CREATE INDEX rule_state_tags_by_key ON rule_state_tags (rule_set, key);
