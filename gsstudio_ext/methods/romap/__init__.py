"""RoMaP (romap-ext): part-level 3DGS editing with 3D-GALP part labels, 3D/2D masks and regularized SDS."""
