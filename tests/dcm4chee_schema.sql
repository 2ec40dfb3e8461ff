-- A faithful subset of the dcm4chee 2.x MySQL schema (create.mysql): the
-- tables the indexer reads, with dcm4chee's own names, types and indexes.
-- Text columns are VARCHAR(250) BINARY and name no character set, as in
-- dcm4chee, so they take the database default (latin1 or utf8).

CREATE TABLE patient (
  pk BIGINT AUTO_INCREMENT PRIMARY KEY,
  merge_fk BIGINT,
  pat_id VARCHAR(250) BINARY,
  pat_id_issuer VARCHAR(250) BINARY,
  pat_name VARCHAR(250) BINARY,
  pat_fn_sx VARCHAR(250) BINARY,
  pat_gn_sx VARCHAR(250) BINARY,
  pat_i_name VARCHAR(250) BINARY,
  pat_p_name VARCHAR(250) BINARY,
  pat_birthdate VARCHAR(250) BINARY,
  pat_sex VARCHAR(250) BINARY,
  pat_custom1 VARCHAR(250) BINARY,
  created_time DATETIME,
  updated_time DATETIME,
  pat_attrs LONGBLOB,
  INDEX pat_merge_fk (merge_fk),
  INDEX pat_id (pat_id(64), pat_id_issuer(64)),
  INDEX pat_name (pat_name(64)),
  FOREIGN KEY (merge_fk) REFERENCES patient(pk)
) ENGINE=InnoDB;

CREATE TABLE study (
  pk BIGINT AUTO_INCREMENT PRIMARY KEY,
  patient_fk BIGINT,
  accno_issuer_fk BIGINT,
  study_iuid VARCHAR(250) BINARY NOT NULL,
  study_id VARCHAR(250) BINARY,
  study_datetime DATETIME,
  accession_no VARCHAR(250) BINARY,
  ref_physician VARCHAR(250) BINARY,
  ref_phys_fn_sx VARCHAR(250) BINARY,
  ref_phys_gn_sx VARCHAR(250) BINARY,
  ref_phys_i_name VARCHAR(250) BINARY,
  ref_phys_p_name VARCHAR(250) BINARY,
  study_desc VARCHAR(250) BINARY,
  study_custom1 VARCHAR(250) BINARY,
  study_custom2 VARCHAR(250) BINARY,
  study_custom3 VARCHAR(250) BINARY,
  study_status_id VARCHAR(250) BINARY,
  mods_in_study VARCHAR(250) BINARY,
  cuids_in_study VARCHAR(250) BINARY,
  num_series INTEGER NOT NULL,
  num_instances INTEGER NOT NULL,
  ext_retr_aet VARCHAR(250) BINARY,
  retrieve_aets VARCHAR(250) BINARY,
  fileset_iuid VARCHAR(250) BINARY,
  fileset_id VARCHAR(250) BINARY,
  availability INTEGER NOT NULL,
  study_status INTEGER NOT NULL,
  checked_time DATETIME,
  created_time DATETIME,
  updated_time DATETIME,
  study_attrs LONGBLOB,
  UNIQUE INDEX study_iuid (study_iuid(64)),
  INDEX patient_fk (patient_fk),
  INDEX study_datetime (study_datetime),
  INDEX study_status (study_status),
  INDEX study_created (created_time),
  INDEX study_updated (updated_time),
  INDEX study_checked (checked_time),
  FOREIGN KEY (patient_fk) REFERENCES patient(pk)
) ENGINE=InnoDB;

CREATE TABLE series (
  pk BIGINT AUTO_INCREMENT PRIMARY KEY,
  study_fk BIGINT,
  series_iuid VARCHAR(250) BINARY NOT NULL,
  modality VARCHAR(250) BINARY,
  num_instances INTEGER NOT NULL,
  created_time DATETIME,
  updated_time DATETIME,
  INDEX series_study_fk (study_fk),
  FOREIGN KEY (study_fk) REFERENCES study(pk)
) ENGINE=InnoDB;
