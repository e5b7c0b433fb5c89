"""The built-in worlds: procedurally generated, captioned data with ground truth.

``tessera.modalities.world.visual`` draws images and videos of coloured shapes;
``tessera.modalities.world.checker`` reads their attributes back without a learned model,
so text→image and text→video generation can be scored automatically.
"""
