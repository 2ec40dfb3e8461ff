-- The dcm4chee-arc-light 5.35 tables the indexer reads, on MySQL/MariaDB,
-- as its create-mysql.sql declares them (see arclight5_schema_postgresql.sql).
-- arc-light's scripts set no character set: the server's default applies.

CREATE TABLE person_name (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  alphabetic_name VARCHAR(255) NOT NULL,
  ideographic_name VARCHAR(255) NOT NULL,
  phonetic_name VARCHAR(255) NOT NULL,
  INDEX IDX7xfekrnrdl0l5v48tfeokvm5e (alphabetic_name)
) ENGINE=InnoDB;

CREATE TABLE patient (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  created_time DATETIME(6) NOT NULL,
  updated_time DATETIME(6) NOT NULL,
  version BIGINT,
  merge_fk BIGINT,
  pat_name_fk BIGINT,
  num_studies INTEGER NOT NULL DEFAULT 0,
  pat_birthdate VARCHAR(255) NOT NULL DEFAULT '*',
  pat_sex VARCHAR(255) NOT NULL DEFAULT '*',
  verification_status TINYINT NOT NULL DEFAULT 0,
  UNIQUE KEY UK_pat_name_fk (pat_name_fk),
  INDEX IDXe1r5ocmrxj8ydjpxnw6wjhpam (created_time),
  CONSTRAINT FKdvb3tlg2vj4p6h9q4rw4v09d4 FOREIGN KEY (merge_fk) REFERENCES patient (pk),
  CONSTRAINT FK_pat_name FOREIGN KEY (pat_name_fk) REFERENCES person_name (pk)
) ENGINE=InnoDB;

CREATE TABLE patient_id (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  pat_id VARCHAR(255) NOT NULL,
  entity_id VARCHAR(255) NOT NULL DEFAULT '*',
  entity_uid VARCHAR(255) NOT NULL DEFAULT '*',
  entity_uid_type VARCHAR(255) NOT NULL DEFAULT '*',
  pat_name VARCHAR(255) NOT NULL DEFAULT '*',
  pat_id_type_code VARCHAR(255),
  version BIGINT,
  patient_fk BIGINT NOT NULL,
  UNIQUE KEY UKpatient_id (pat_id(128), entity_id(128), entity_uid(128),
                           entity_uid_type(128), pat_name(128)),
  INDEX IDXd1sdyupb0vwvx23jownjnyy72 (pat_id),
  CONSTRAINT FK1ydtnvm43pjsgdc1b6ef3tx2x FOREIGN KEY (patient_fk) REFERENCES patient (pk)
) ENGINE=InnoDB;

CREATE TABLE study (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  study_iuid VARCHAR(255) NOT NULL,
  study_date VARCHAR(255) NOT NULL,
  study_time VARCHAR(255) NOT NULL,
  study_desc VARCHAR(255) NOT NULL,
  accession_no VARCHAR(255) NOT NULL DEFAULT '*',
  patient_fk BIGINT NOT NULL,
  created_time DATETIME(6) NOT NULL,
  updated_time DATETIME(6) NOT NULL,
  modified_time DATETIME(6) NOT NULL,
  access_time DATETIME(6) NOT NULL,
  version BIGINT,
  rejection_state TINYINT NOT NULL,
  completeness TINYINT NOT NULL DEFAULT 0,
  expiration_state TINYINT NOT NULL DEFAULT 0,
  study_size BIGINT NOT NULL,
  study_deleting BIT(1) NOT NULL DEFAULT 0,
  UNIQUE KEY UK_study_iuid (study_iuid),
  INDEX IDXq8k2sl3kjl18qg1nr19l47tl1 (access_time),
  INDEX IDX6ry2squ4qcv129lxpae1oy93m (created_time),
  INDEX IDXfypbtohf5skbd3bkyd792a6dt (rejection_state),
  INDEX IDXq7vxiaj1q6ojfxdq1g9jjxgqv (study_size),
  INDEX IDXj3q7k1cj5nkkt5mf0b0pl6u0y (study_date),
  CONSTRAINT FKocnq3so9ej7h0mnd6a6arjf6c FOREIGN KEY (patient_fk) REFERENCES patient (pk)
) ENGINE=InnoDB;

CREATE TABLE study_query_attrs (
  pk BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  study_fk BIGINT NOT NULL,
  view_id VARCHAR(255),
  num_series INTEGER,
  num_instances INTEGER,
  mods_in_study VARCHAR(255),
  cuids_in_study VARCHAR(4000),
  retrieve_aets VARCHAR(255),
  availability TINYINT,
  UNIQUE KEY UK_view_study (view_id, study_fk),
  CONSTRAINT FKfbvnp2qakfvdnj1l0aby9lz6s FOREIGN KEY (study_fk) REFERENCES study (pk)
) ENGINE=InnoDB;
