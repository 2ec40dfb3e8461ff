-- The dcm4chee-arc-light 5.35 tables the indexer reads, on PostgreSQL, as
-- its create-psql.sql declares them: the columns, types, NOT NULLs and
-- indexes that matter to the indexer (written from the facts, not copied).
-- Index names as a fresh 5.31.1+ install has them.

CREATE TABLE person_name (
  pk BIGSERIAL PRIMARY KEY,
  alphabetic_name VARCHAR(255) NOT NULL,   -- 'FAMILY^GIVEN^MIDDLE^PREFIX^SUFFIX^'
  ideographic_name VARCHAR(255) NOT NULL,
  phonetic_name VARCHAR(255) NOT NULL
);
CREATE INDEX IDX7xfekrnrdl0l5v48tfeokvm5e ON person_name (alphabetic_name);
CREATE INDEX alphabetic_name_upper_idx ON person_name (upper(alphabetic_name));

CREATE TABLE patient (
  pk BIGSERIAL PRIMARY KEY,
  created_time TIMESTAMP(6) NOT NULL,
  updated_time TIMESTAMP(6) NOT NULL,
  version BIGINT,
  merge_fk BIGINT REFERENCES patient (pk),
  pat_name_fk BIGINT UNIQUE REFERENCES person_name (pk),
  num_studies INTEGER NOT NULL DEFAULT 0,
  pat_birthdate VARCHAR(255) NOT NULL DEFAULT '*',
  pat_sex VARCHAR(255) NOT NULL DEFAULT '*',
  verification_status SMALLINT NOT NULL DEFAULT 0
);
CREATE INDEX IDXe1r5ocmrxj8ydjpxnw6wjhpam ON patient (created_time);
CREATE INDEX FKdvb3tlg2vj4p6h9q4rw4v09d4 ON patient (merge_fk);

CREATE TABLE patient_id (
  pk BIGSERIAL PRIMARY KEY,
  pat_id VARCHAR(255) NOT NULL,
  entity_id VARCHAR(255) NOT NULL DEFAULT '*',
  entity_uid VARCHAR(255) NOT NULL DEFAULT '*',
  entity_uid_type VARCHAR(255) NOT NULL DEFAULT '*',
  pat_name VARCHAR(255) NOT NULL DEFAULT '*',
  pat_id_type_code VARCHAR(255),
  version BIGINT,
  patient_fk BIGINT NOT NULL REFERENCES patient (pk),
  UNIQUE (pat_id, entity_id, entity_uid, entity_uid_type, pat_name)
);
CREATE INDEX IDXd1sdyupb0vwvx23jownjnyy72 ON patient_id (pat_id);
CREATE INDEX FK1ydtnvm43pjsgdc1b6ef3tx2x ON patient_id (patient_fk);

CREATE TABLE study (
  pk BIGSERIAL PRIMARY KEY,
  study_iuid VARCHAR(255) NOT NULL UNIQUE,
  study_date VARCHAR(255) NOT NULL,        -- 'YYYYMMDD' or '*'
  study_time VARCHAR(255) NOT NULL,        -- 'HHMMSS.fff' or '*'
  study_desc VARCHAR(255) NOT NULL,        -- '*' when absent
  accession_no VARCHAR(255) NOT NULL DEFAULT '*',
  patient_fk BIGINT NOT NULL REFERENCES patient (pk),
  created_time TIMESTAMP(6) NOT NULL,
  updated_time TIMESTAMP(6) NOT NULL,      -- no index, as in arc-light
  modified_time TIMESTAMP(6) NOT NULL,
  access_time TIMESTAMP(6) NOT NULL,
  version BIGINT,
  rejection_state SMALLINT NOT NULL,       -- 0 NONE, 1 PARTIAL, 2 COMPLETE, 3 EMPTY
  completeness SMALLINT NOT NULL DEFAULT 0,
  expiration_state SMALLINT NOT NULL DEFAULT 0,
  study_size BIGINT NOT NULL,              -- -1: unknown (dirty), -2: being computed
  study_deleting BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX IDXq8k2sl3kjl18qg1nr19l47tl1 ON study (access_time);
CREATE INDEX IDX6ry2squ4qcv129lxpae1oy93m ON study (created_time);
CREATE INDEX IDXfypbtohf5skbd3bkyd792a6dt ON study (rejection_state);
CREATE INDEX IDXq7vxiaj1q6ojfxdq1g9jjxgqv ON study (study_size);
CREATE INDEX IDXj3q7k1cj5nkkt5mf0b0pl6u0y ON study (study_date);
CREATE INDEX FKocnq3so9ej7h0mnd6a6arjf6c ON study (patient_fk);

-- A cache: deleted on every store, rejection and deletion, rebuilt minutes
-- later (or on the next query) for every query/retrieve view.
CREATE TABLE study_query_attrs (
  pk BIGSERIAL PRIMARY KEY,
  study_fk BIGINT NOT NULL REFERENCES study (pk),
  view_id VARCHAR(255),
  num_series INTEGER,
  num_instances INTEGER,
  mods_in_study VARCHAR(255),              -- backslash-separated, in no order
  cuids_in_study VARCHAR(4000),
  retrieve_aets VARCHAR(255),
  availability SMALLINT,
  UNIQUE (view_id, study_fk)
);
CREATE INDEX FKfbvnp2qakfvdnj1l0aby9lz6s ON study_query_attrs (study_fk);
