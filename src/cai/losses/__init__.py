"""Loss maths of RL-CAI as small pure torch functions: soft Bradley-Terry (`bradley_terry`) and PPO (`ppo`)."""
