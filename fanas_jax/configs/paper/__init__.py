"""The paper's experiments (README: "The paper's experiments")."""
