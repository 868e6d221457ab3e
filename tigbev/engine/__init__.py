"""Library code the stages share (a stage never imports another stage): scoring with the devkit metrics, and the
online teacher as a target source."""
