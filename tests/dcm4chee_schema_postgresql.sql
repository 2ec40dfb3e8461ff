-- A faithful subset of the dcm4chee 2.x PostgreSQL schema (create.psql): the
-- tables the indexer reads, with dcm4chee's own names, types and indexes:
-- TEXT instead of VARCHAR(250) BINARY, SERIAL8 keys, full-column indexes.

CREATE TABLE patient (
  pk SERIAL8 PRIMARY KEY,
  merge_fk INT8,
  pat_id TEXT,
  pat_id_issuer TEXT,
  pat_name TEXT,
  pat_fn_sx TEXT,
  pat_gn_sx TEXT,
  pat_i_name TEXT,
  pat_p_name TEXT,
  pat_birthdate TEXT,
  pat_sex TEXT,
  pat_custom1 TEXT,
  created_time TIMESTAMP,
  updated_time TIMESTAMP,
  pat_attrs BYTEA,
  FOREIGN KEY (merge_fk) REFERENCES patient(pk)
);
CREATE INDEX pat_merge_fk ON patient (merge_fk);
CREATE INDEX pat_id ON patient (pat_id, pat_id_issuer);
CREATE INDEX pat_name ON patient (pat_name);

CREATE TABLE study (
  pk SERIAL8 PRIMARY KEY,
  patient_fk INT8,
  accno_issuer_fk INT8,
  study_iuid TEXT NOT NULL,
  study_id TEXT,
  study_datetime TIMESTAMP,
  accession_no TEXT,
  ref_physician TEXT,
  study_desc TEXT,
  study_custom1 TEXT,
  study_status_id TEXT,
  mods_in_study TEXT,
  cuids_in_study TEXT,
  num_series INTEGER NOT NULL,
  num_instances INTEGER NOT NULL,
  ext_retr_aet TEXT,
  retrieve_aets TEXT,
  fileset_iuid TEXT,
  fileset_id TEXT,
  availability INTEGER NOT NULL,
  study_status INTEGER NOT NULL,
  checked_time TIMESTAMP,
  created_time TIMESTAMP,
  updated_time TIMESTAMP,
  study_attrs BYTEA,
  FOREIGN KEY (patient_fk) REFERENCES patient(pk)
);
CREATE UNIQUE INDEX study_iuid ON study (study_iuid);
CREATE INDEX patient_fk ON study (patient_fk);
CREATE INDEX study_datetime ON study (study_datetime);
CREATE INDEX study_status ON study (study_status);
CREATE INDEX study_created ON study (created_time);
CREATE INDEX study_updated ON study (updated_time);
CREATE INDEX study_checked ON study (checked_time);

CREATE TABLE series (
  pk SERIAL8 PRIMARY KEY,
  study_fk INT8,
  series_iuid TEXT NOT NULL,
  modality TEXT,
  num_instances INTEGER NOT NULL,
  created_time TIMESTAMP,
  updated_time TIMESTAMP,
  FOREIGN KEY (study_fk) REFERENCES study(pk)
);
CREATE INDEX series_study_fk ON series (study_fk);
