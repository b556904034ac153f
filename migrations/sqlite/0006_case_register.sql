-- The register of cases the periodic summaries count (Modello 16 / 16-bis, class V annual, CRE
-- monthly): one row per case, written by the rules in the transaction that decides the case, with
-- what a summary stratifies by. Class V cases are never notified, so the notifications alone could
-- not be counted. A summary reads one area's rows for a date range through the indexes below, never
-- the stored notifications.
CREATE TABLE case_register (
    case_id TEXT PRIMARY KEY,
    -- the rule family ('dm-1990', 'cre') and the notification category (classe-1 … classe-5, cre)
    family TEXT NOT NULL,
    category TEXT NOT NULL,
    -- the listed disease (ICD-9-CM entry of the decree's table) and the code reported
    disease TEXT NOT NULL,
    code TEXT NOT NULL,
    -- the Europe/Rome day (yyyymmdd) that puts the case in a period
    day INTEGER NOT NULL,
    -- completed years at that day (NULL: no birth date), administrative gender
    age INTEGER,
    sex TEXT NOT NULL,
    comune TEXT,
    province TEXT,
    asl TEXT,
    region TEXT,
    active BOOLEAN NOT NULL,
    -- what a reader opens to see the case: its notification, or (class V) its reports
    refs TEXT NOT NULL,
    -- the day before the last change that moved the case (its old period is recomputed too)
    previous_day INTEGER,
    updated_at BIGINT NOT NULL
);

-- a summary asks for its categories in one area and period: each probe is one index range
CREATE INDEX case_register_by_region ON case_register (region, category, day);
CREATE INDEX case_register_by_asl ON case_register (asl, category, day);
CREATE INDEX case_register_by_province ON case_register (province, category, day);
CREATE INDEX case_register_by_category ON case_register (category, day);
-- the stored summaries are recomputed for the periods whose cases changed since the last run
CREATE INDEX case_register_by_update ON case_register (updated_at);
